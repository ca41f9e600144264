// Walk through the gateway's MiAuth onboarding in headless Chromium: fill in
// the form, approve on the (fake) Misskey page, read the credential from the
// result page. Prints JSON with the credential, the HTML of every page and
// every URL the browser requested.
//
// Usage: node miauth.mjs FORM_URL PERMISSIONS USER_DATA_DIR
//
// FORM_URL is the gateway's /_gateway/miauth/ page with principal and invite
// in its query. PERMISSIONS is a comma-separated list typed into the form's
// "other kinds" field. Chromium is Debian's /usr/bin/chromium; requests to
// any host but loopback are aborted.

import { chromium } from 'playwright-core';

const args = process.argv.slice(2);
if (args.length !== 3) {
	process.stderr.write('usage: node miauth.mjs FORM_URL PERMISSIONS USER_DATA_DIR\n');
	process.exit(2);
}
const [formUrl, permissions, userDataDir] = args;
const LOOPBACK = new Set(['127.0.0.1', 'localhost', '[::1]']);

const context = await chromium.launchPersistentContext(userDataDir, {
	executablePath: '/usr/bin/chromium',
	headless: true,
	args: [
		'--headless',
		'--no-sandbox',
		'--disable-gpu',
		'--disable-quic',
		'--no-first-run',
		'--disable-background-networking',
		'--disable-component-update',
		'--disable-sync',
	],
	timeout: 30_000,
});

const urls = [];
const blocked = [];
const pages = {};
let status = 1;
try {
	await context.route('**/*', (route) => {
		const url = new URL(route.request().url());
		if (LOOPBACK.has(url.hostname)) {
			return route.continue();
		}
		blocked.push(url.href);
		return route.abort();
	});
	const page = context.pages()[0] ?? (await context.newPage());
	page.setDefaultTimeout(15_000);
	page.on('request', (request) => urls.push(request.url()));

	await page.goto(formUrl);
	pages.form = await page.content();
	await page.fill('#more', permissions);
	await Promise.all([page.waitForURL(/\/miauth\/[0-9a-f-]+\?/), page.click('#start')]);
	pages.approval = await page.content();
	const approvalUrl = page.url();

	await Promise.all([page.waitForURL(/\/_gateway\/miauth\/callback\?/), page.click('#approve')]);
	pages.result = await page.content();
	const credential = await page.inputValue('#credential');
	const scope = await page.textContent('#scope');

	process.stdout.write(
		JSON.stringify({ credential, scope, approvalUrl, finalUrl: page.url(), urls, blocked, pages }) + '\n',
	);
	status = 0;
} catch (error) {
	process.stderr.write(`${error.stack ?? error}\nURLs: ${urls.join(' ')}\n`);
} finally {
	await context.close();
}
process.exit(status);
