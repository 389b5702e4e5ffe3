// Drives the exported model's web page in headless Chromium (used by tests/test_export.py):
//   node drive_page.js URL PROMPT TOKENS SCREENSHOT.png
// Types the prompt, sets greedy decoding, presses Generate, waits for the end, takes a screenshot,
// and prints {"text": the page's output, "status": the status line} as JSON.
const { chromium } = require("playwright-core");

(async () => {
  const [url, prompt, tokens, screenshot] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url);
    await page.waitForSelector("body[data-state=ready], body[data-state=error]", { timeout: 30000 });
    await page.fill("#prompt", prompt);
    await page.fill("#tokens", tokens);
    await page.fill("#temperature", "0");
    await page.click("#generate");
    await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 60000 });
    const text = await page.textContent("#output");
    const status = await page.textContent("#status");
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(JSON.stringify({ text, status, errors }));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });
