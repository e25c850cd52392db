// The web side as people use it, in headless Chromium: a user signs in with a
// code read from the SMTP server and creates a key; a provider links a node from
// the browser; the key is refused for want of credits until an admin deposits
// some; the user's call shows up as usage and as the provider's earnings; the
// admin suspends the user and the key stops working. Screenshots of the main pages go to $CXMPUTE_SCREENSHOTS.
//
// Started by crates/e2e/tests/browser.rs, which runs the gateway, the SMTP
// server and the fake upstream and passes their addresses in the environment.
// Exits 0 when every step held; otherwise prints the failed step and exits 1.

import { spawn } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const GATEWAY = env("CXMPUTE_GATEWAY_URL");
const MAILDIR = env("CXMPUTE_MAILDIR");
const PROVIDER_BIN = env("CXMPUTE_PROVIDER_BIN");
const PROVIDER_HOME = env("CXMPUTE_PROVIDER_HOME");
const UPSTREAM = env("CXMPUTE_UPSTREAM_URL");
const SHOTS = env("CXMPUTE_SCREENSHOTS");
const ADMIN = env("CXMPUTE_ADMIN_EMAIL");
const CHROMIUM = process.env.CXMPUTE_CHROMIUM || "/usr/bin/chromium";
const MODEL = "fake-chat";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const children = [];
let step = "starting";

function check(ok, what) {
  if (!ok) throw new Error(what);
}

/** Polls `f` until it returns a truthy value or `ms` pass. */
async function until(what, ms, f) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(250);
  }
}

/** The six-digit code in the newest message to `to`, newer than `after`. */
function codeFor(to, seen) {
  const dir = join(MAILDIR, "new");
  for (const name of readdirSync(dir)) {
    if (seen.has(name)) continue;
    const text = readFileSync(join(dir, name), "utf8");
    const lines = text.split(/\r?\n/);
    if (!lines.some((l) => l.startsWith("To:") && l.includes(to))) continue;
    seen.add(name);
    const subject = lines.find((l) => l.startsWith("Subject:")) || "";
    const code = subject.replace(/\D/g, "");
    check(code.length === 6, `no six-digit code in "${subject}"`);
    return code;
  }
  return null;
}
const seenMail = new Set();

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

/** Signs `email` in through the login form; the page ends on `landing`. */
async function signIn(page, email, { shots = false, landing = "/app" } = {}) {
  await page.goto(`${GATEWAY}/login`);
  await page.fill("#email", email);
  if (shots) await shot(page, "login");
  await page.click("button:has-text('Send me a code')");
  await page.waitForSelector("#code");
  const code = await until(`a code mailed to ${email}`, 20000, () => codeFor(email, seenMail));
  await page.fill("#code", code);
  if (shots) await shot(page, "login-code");
  await Promise.all([page.waitForURL((u) => u.pathname === landing), page.click("button:has-text('Sign in')")]);
}

async function api(key, body) {
  const res = await fetch(`${GATEWAY}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: res.status, json: await res.json().catch(() => null) };
}

function provider(args) {
  const child = spawn(PROVIDER_BIN, args, {
    env: {
      PATH: process.env.PATH,
      HOME: PROVIDER_HOME,
      XDG_CONFIG_HOME: join(PROVIDER_HOME, "config"),
      CXMPUTE_MODELS_DIR: join(PROVIDER_HOME, "models"),
      CXMPUTE_LOG: process.env.CXMPUTE_TEST_LOG || "warn",
    },
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(child);
  return child;
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Root in a container has no user namespaces for Chromium's sandbox.
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  try {
    const viewport = { width: 1100, height: 800 };
    const user = await (await browser.newContext({ viewport })).newPage();
    const admin = await (await browser.newContext({ viewport })).newPage();
    const prov = await (await browser.newContext({ viewport })).newPage();
    const userEmail = "ada@example.com";

    step = "public pages";
    await user.goto(`${GATEWAY}/models`);
    check((await user.textContent("h1")) === "Models", "the model catalog page");
    await shot(user, "models");

    step = "user signs in";
    await signIn(user, userEmail, { shots: true });
    check((await user.textContent("h1")) === "Dashboard", "the dashboard after login");

    step = "user creates a key";
    await user.fill("#key-name", "browser");
    await user.click("button:has-text('Create key')");
    const secret = (await user.textContent(".msg.ok .secret")).trim();
    check(secret.length > 20, `a key shown once, got "${secret}"`);

    step = "provider links a node from the browser";
    await signIn(prov, "grace@example.com");
    const login = provider(["login", "--gateway", GATEWAY, "--name", "browser rig"]);
    const loginDone = new Promise((r) => login.on("exit", (code) => r(code)));
    const link = await new Promise((resolve, reject) => {
      const lines = createInterface({ input: login.stdout });
      lines.on("line", (line) => {
        const at = line.indexOf("/link?code=");
        if (at >= 0) resolve(line.slice(at).trim());
      });
      login.on("exit", () => reject(new Error("cxmpute-provider login exited without a /link URL")));
    });
    await prov.goto(`${GATEWAY}${link}`);
    check((await prov.textContent("body")).includes("browser rig"), "the link page names the node");
    await shot(prov, "link");
    await prov.click("button[value=approve]");
    await prov.waitForSelector("text=Node approved");
    check((await loginDone) === 0, "cxmpute-provider login exits 0 after approval");
    const node = provider(["start", "--headless", "--upstream", UPSTREAM, "--no-chat", "--no-embeddings", "--no-speech"]);
    node.stdout.resume();

    step = "a key without credits";
    await until("the node to serve the model", 60000, async () => {
      const r = await api(secret, { model: MODEL, messages: [{ role: "user", content: "hi" }] });
      if (r.status === 402) return r;
      check(r.status === 503 || r.status === 404, `unexpected status ${r.status}: ${JSON.stringify(r.json)}`);
      return null;
    });

    step = "admin deposits credits";
    await signIn(admin, ADMIN, { landing: "/app" });
    await admin.goto(`${GATEWAY}/admin`);
    await admin.fill("#q", userEmail);
    await admin.click("button:has-text('Search')");
    await admin.waitForSelector(`td:has-text("${userEmail}")`);
    await Promise.all([admin.waitForURL(/\/admin\/users\//), admin.click(`tr:has(td:has-text("${userEmail}")) a[href^="/admin/users/"]`)]);
    const userPage = admin.url();
    await admin.fill("#c-amount", "5");
    await admin.fill("#c-reason", "welcome credit");
    await admin.click("button:has-text('Record')");
    await admin.waitForSelector("text=welcome credit");
    await shot(admin, "admin-account");
    await admin.goto(`${GATEWAY}/admin`);
    await shot(admin, "admin");

    step = "user calls the API";
    const answer = await api(secret, { model: MODEL, messages: [{ role: "user", content: "hello from chromium" }] });
    check(answer.status === 200, `with credits the key works: ${answer.status} ${JSON.stringify(answer.json)}`);
    check(answer.json.choices[0].message.content.length > 0, "an answer");
    await until("the usage on the dashboard", 20000, async () => {
      await user.goto(`${GATEWAY}/app`);
      const text = await user.textContent("body");
      return text.includes("Recent usage") && text.includes(MODEL) && !text.includes("No requests yet");
    });
    check(
      (await user.textContent("body")).includes(`curl ${GATEWAY}/v1/chat/completions`),
      "the code snippets use the gateway's real address"
    );
    await shot(user, "dashboard");

    step = "provider sees earnings";
    await until("earnings on the provider page", 20000, async () => {
      await prov.goto(`${GATEWAY}/app/provider`);
      const served = await prov.textContent("tr:has(th:has-text('Requests served')) td");
      const earned = await prov.textContent("tr:has(th:has-text('Earned')) td");
      return served.trim() === "1" && /[1-9]/.test(earned) ? true : null;
    });
    check((await prov.textContent("body")).includes("browser rig"), "the device is listed");
    await shot(prov, "provider");

    step = "admin suspends the user";
    await admin.goto(userPage);
    await admin.fill("#s-reason", "abuse report");
    await admin.click("button:has-text('Suspend')");
    await admin.waitForSelector("text=abuse report");
    const refused = await until("the key to stop working", 10000, async () => {
      const r = await api(secret, { model: MODEL, messages: [{ role: "user", content: "again" }] });
      return r.status === 200 ? null : r;
    });
    check(refused.status === 403, `a suspended account's key is refused with 403: ${refused.status}`);
    check(refused.json?.error?.code === "account_suspended", `error code: ${JSON.stringify(refused.json)}`);

    step = "public network page";
    await user.goto(`${GATEWAY}/network`);
    await shot(user, "network");
    node.kill("SIGTERM");
    console.log(JSON.stringify({ ok: true, screenshots: readdirSync(SHOTS).sort() }));
  } finally {
    await browser.close();
  }
}

try {
  await main();
} catch (e) {
  console.error(`browser flow failed at "${step}": ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
}
