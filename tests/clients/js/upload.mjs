// Upload a small file through misskey-js and print the result as JSON.
//
// Usage: node upload.mjs BASE_URL CREDENTIAL

import { api } from 'misskey-js';

const [origin, credential] = process.argv.slice(2);
const client = new api.APIClient({ origin, credential });
const bytes = new Uint8Array(70000).map((_, index) => index % 251);
try {
	const file = new Blob([bytes], { type: 'application/octet-stream' });
	const result = await client.request('drive/files/create', { file, name: 'upload.bin' });
	process.stdout.write(JSON.stringify(result) + '\n');
} catch (err) {
	process.stderr.write(`${err?.code ?? err?.name}: ${err?.message}\n`);
	process.exit(1);
}
