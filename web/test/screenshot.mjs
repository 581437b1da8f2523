// Opens console.html in headless Chromium against a VM's WebSocket port
// and saves what the page's canvas shows once the guest's screen has
// arrived. Used by the cluster end-to-end test; also handy by hand.
//
//   node test/screenshot.mjs PAGE_URL OUT.png
//
// PAGE_URL is console.html on a static server, with ?port= or ?url=.
import { chromium } from 'playwright-core';

const [pageUrl, out] = process.argv.slice(2);
if (!pageUrl || !out) {
  console.error('usage: node test/screenshot.mjs PAGE_URL OUT.png');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 800, height: 520 } });
  page.on('console', (m) => console.error(`page: ${m.text()}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => document.body.dataset.state !== 'connecting', null, { timeout: 20000 });
  const state = await page.evaluate(() => document.body.dataset.state);
  if (state !== 'connected') {
    throw new Error(`the page did not connect: ${await page.textContent('#status')}`);
  }
  // The first full update takes a moment to be drawn.
  await page.waitForTimeout(2000);
  await page.locator('#screen canvas').screenshot({ path: out });
  console.log(await page.textContent('#status'));
} finally {
  await browser.close();
}
