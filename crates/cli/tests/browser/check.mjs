// Browser check of the web pages in real headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core; no browser is downloaded). Run by crates/cli/tests/browser.rs
// with BASE_URL, SERVER, API_KEY, SIGNING_SECRET and SCREENSHOTS set.
import { chromium } from "playwright-core";
import { createHmac } from "node:crypto";
import { mkdirSync } from "node:fs";

const { BASE_URL, SERVER, API_KEY, SIGNING_SECRET, SCREENSHOTS } = process.env;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
mkdirSync(SCREENSHOTS, { recursive: true });

function check(condition, message) {
  if (!condition) throw new Error(message);
  console.log("ok -", message);
}

async function push(value) {
  const body = JSON.stringify({ server_id: SERVER, metrics: [{ name: "response_time", type: "histogram", value, timestamp: Date.now() - 20 }] });
  const t = Math.floor(Date.now() / 1000);
  const sig = createHmac("sha256", SIGNING_SECRET).update(`${t}.${body}`).digest("hex");
  const r = await fetch(`${BASE_URL}/api/v1/metrics`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-api-key": API_KEY, "x-signature": `t=${t},v1=${sig}` },
    body,
  });
  if (!r.ok) throw new Error(`push failed: ${r.status} ${await r.text()}`);
}

async function usage() {
  return (await (await fetch(`${BASE_URL}/api/v1/servers/${SERVER}/usage?period=7d`)).json()).raw_totals;
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  // A desktop Chrome user agent: the headless one is (rightly) filtered as a bot.
  const context = await browser.newContext({
    viewport: { width: 1280, height: 1000 },
    userAgent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36",
  });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await page.goto(`${BASE_URL}/`);
  check((await page.title()).includes("MCP"), "the directory opens");
  await page.screenshot({ path: `${SCREENSHOTS}/directory.png`, fullPage: true });
  const viewsBefore = (await usage()).views;

  await page.click(`a[href="/servers/${SERVER}"]`);
  await page.waitForURL(`**/servers/${SERVER}`);
  check(await page.isVisible("#overview"), "the server page opens on Overview");
  await page.click('a[aria-controls="metrics"]');
  check(await page.isVisible("#metrics") && !(await page.isVisible("#overview")), "the Metrics tab switches without a reload");
  const points = await page.locator('#metrics [data-metric="response_time"] .pt').count();
  check(points > 0, `the latency chart has data (${points} points)`);
  await page.screenshot({ path: `${SCREENSHOTS}/metrics.png`, fullPage: true });

  // The page's own view reached the usage beacon.
  let views = viewsBefore;
  for (let i = 0; i < 50 && views <= viewsBefore; i++) {
    await new Promise((r) => setTimeout(r, 100));
    views = (await usage()).views;
  }
  check(views > viewsBefore, `the page view was counted (${viewsBefore} -> ${views})`);

  // The Install button sends its usage event.
  const installsBefore = (await usage()).installs;
  await page.click('button[data-usage="install"]');
  let installs = installsBefore;
  for (let i = 0; i < 50 && installs <= installsBefore; i++) {
    await new Promise((r) => setTimeout(r, 100));
    installs = (await usage()).installs;
  }
  check(installs > installsBefore, "the Install button was counted");
  await page.click('a[aria-controls="metrics"]');

  // Switch the period without a reload, then watch a new sample arrive live.
  await page.evaluate(() => { window.__noReload = true; });
  // Wait for the period switch's own redraw to finish before listening for live ones.
  const switched = page.evaluate(() => new Promise((resolve) => document.addEventListener("charts-updated", resolve, { once: true })));
  await page.click('.periods a[data-period="1h"]');
  await switched;
  await page.waitForFunction(() => document.querySelector('.periods a[aria-current="true"]')?.dataset.period === "1h");
  await page.waitForFunction(() => document.querySelector('#metrics [data-metric="response_time"] svg')?.textContent.includes("· 1h"));
  check(true, "the period switcher redraws the charts for 1h");
  const before = await page.locator('#metrics [data-metric="response_time"] svg').innerHTML();
  const updated = page.evaluate(() => new Promise((resolve) => document.addEventListener("charts-updated", () => resolve(Date.now()), { once: true })));
  const sent = Date.now();
  await push(4321);
  const at = await Promise.race([updated, new Promise((_, reject) => setTimeout(() => reject(new Error("no live update within 5 s")), 5000))]);
  check(await page.evaluate(() => window.__noReload === true), "the page did not reload");
  check(at - sent < 2000, `the charts updated live ${at - sent} ms after the sample was pushed`);
  const after = await page.locator('#metrics [data-metric="response_time"] svg').innerHTML();
  check(after !== before, "the latency chart was redrawn with the new sample");
  await page.screenshot({ path: `${SCREENSHOTS}/live.png`, fullPage: true });
  // Ingest → page update latency over several samples (reported, the target is < 2 s).
  const delays = [];
  for (let i = 0; i < 10; i++) {
    const done = page.evaluate(() => new Promise((resolve) => document.addEventListener("charts-updated", () => resolve(Date.now()), { once: true })));
    const t0 = Date.now();
    await push(100 + i);
    delays.push((await Promise.race([done, new Promise((_, reject) => setTimeout(() => reject(new Error("no live update within 5 s")), 5000))])) - t0);
    await new Promise((r) => setTimeout(r, 300));
  }
  delays.sort((a, b) => a - b);
  console.log(`live update delays ms: ${delays.join(" ")}`);
  check(delays[delays.length - 1] < 2000, `every live update arrived within 2 s (max ${delays[delays.length - 1]} ms)`);
  check(errors.length === 0, `no script errors (${errors.join("; ")})`);
} finally {
  await browser.close();
}
