// Open a misskey-js Stream, connect to the main channel and print the first
// message the channel receives as JSON.
//
// Usage: node stream.mjs BASE_URL CREDENTIAL
//
// Node.js 20 needs --experimental-websocket for the global WebSocket that
// misskey-js uses. Exits 0 after printing the message, 1 when the connection
// fails or no message arrives within 10 seconds.

import { Stream } from 'misskey-js';

const args = process.argv.slice(2);
if (args.length !== 2) {
	process.stderr.write('usage: node stream.mjs BASE_URL CREDENTIAL\n');
	process.exit(2);
}
if (typeof WebSocket === 'undefined') {
	process.stderr.write('no global WebSocket: run Node.js 20 with --experimental-websocket\n');
	process.exit(2);
}

const stream = new Stream(args[0], { token: args[1] });
const timer = setTimeout(() => {
	process.stderr.write('timed out: no message on the main channel within 10 seconds\n');
	process.exit(1);
}, 10_000);

stream.on('_disconnected_', () => {
	process.stderr.write('the stream was disconnected\n');
});

const main = stream.useChannel('main');
main.on('connected', (body) => {
	clearTimeout(timer);
	process.stdout.write(JSON.stringify(body) + '\n');
	stream.close();
	process.exit(0);
});
