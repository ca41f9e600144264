// Call four Misskey endpoints through misskey-js and print the results as JSON.
//
// Usage: node calls.mjs BASE_URL CREDENTIAL
//
// On success, prints one JSON object that maps each endpoint name to the value
// misskey-js returned and exits 0. On any error, prints its type and message
// to stderr and exits 1.

import { api } from 'misskey-js';

function describeError(err) {
	// misskey-js rejects with a plain object, not an Error, when the response
	// status is neither 200 nor 204.
	if (api.isAPIError(err)) {
		if (err.code === undefined) {
			return 'APIError: response status was not 200 or 204 and the body had no "error" object';
		}
		return `APIError: ${err.code} (${err.id}): ${err.message}`;
	}
	if (err instanceof Error) {
		// Node's fetch() reports a network failure as "fetch failed" and keeps
		// the reason, such as ECONNREFUSED, in `cause`.
		const cause = err.cause ? ` (cause: ${err.cause})` : '';
		return `${err.name}: ${err.message}${cause}`;
	}
	return `${typeof err}: ${JSON.stringify(err)}`;
}

async function callEndpoints(baseUrl, credential) {
	const client = new api.APIClient({ origin: baseUrl, credential });
	return {
		'i': await client.request('i'),
		'meta': await client.request('meta'),
		'notes/create': await client.request('notes/create', { text: 'hello from misskey-js' }),
		'notes/local-timeline': await client.request('notes/local-timeline', { limit: 5 }),
	};
}

const args = process.argv.slice(2);
if (args.length !== 2) {
	process.stderr.write('usage: node calls.mjs BASE_URL CREDENTIAL\n');
	process.exit(2);
}

try {
	const results = await callEndpoints(args[0], args[1]);
	process.stdout.write(JSON.stringify(results) + '\n');
} catch (err) {
	process.stderr.write(describeError(err) + '\n');
	process.exit(1);
}
