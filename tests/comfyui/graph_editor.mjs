// Drives ComfyUI's graph editor in headless Chromium for test_graph_editor.py; prints one JSON report.
// usage: node graph_editor.mjs <server url> <workflow dir> <screenshot dir> [stand-in prompts .json]
// The stand-in prompts (workflow file name -> API prompt with the UI's node ids) are run from the page with its
// client id, so the loaded template shows real outputs (the Sampler's preview, the video, the Status report).
// env: PLAYWRIGHT_CORE_DIR (the playwright-core package folder, or a folder where `npm install playwright-core`
// ran), CHROMIUM_PATH (default /usr/bin/chromium)
import { createRequire } from "module";
import { readdirSync, readFileSync } from "fs";
import { join } from "path";

const require = createRequire(import.meta.url);
function loadPlaywright(dir) {
  try {
    return require(dir); // the package folder itself (what .ci/run exports)
  } catch {
    return require(require.resolve("playwright-core", { paths: [dir] })); // or a folder that has it installed
  }
}
const { chromium } = loadPlaywright(process.env.PLAYWRIGHT_CORE_DIR || process.cwd());
const [url, workflowDir, screenshotDir, standInFile] = process.argv.slice(2);
const standIns = standInFile ? JSON.parse(readFileSync(standInFile, "utf8")) : {};
const OUR_NODES = ["OfficialDistriFusionModelLoader", "OfficialDistriFusionSampler", "OfficialDistriFusionStatus"];

// Queue a prompt as this page's client (so its /ws events reach the loaded graph) and wait for the end.
async function runInPage(page, prompt) {
  return page.evaluate(async (prompt) => {
    const api = window.app.api;
    const done = new Promise((resolve) => {
      for (const kind of ["execution_success", "execution_error", "execution_interrupted"]) {
        api.addEventListener(kind, (e) => resolve(kind), { once: true });
      }
    });
    const response = await api.fetchApi("/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt, client_id: api.clientId }),
    });
    if (!response.ok) return { run: `rejected: ${response.status} ${await response.text()}` };
    const result = await Promise.race([done, new Promise((r) => setTimeout(() => r("timeout"), 240000))]);
    return { run: result };
  }, prompt);
}

// Every node's rectangle on the canvas (title included), and the canvas's size at 100% zoom.
async function layout(page) {
  return page.evaluate(() => {
    const canvas = window.app.canvas;
    const nodes = window.app.graph.nodes.map((n) => {
      const title = n.constructor.title_mode === 1 ? 0 : window.LiteGraph.NODE_TITLE_HEIGHT;
      return { id: n.id, type: n.type, title: n.title, rect: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title] };
    });
    return { nodes, canvas: [canvas.canvas.clientWidth, canvas.canvas.clientHeight], scale: canvas.ds.scale,
             offset: [...canvas.ds.offset] };
  });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const report = { startup_errors: [], workflows: {}, created: {}, status_text: null };
let errors = report.startup_errors;
try {
  const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}\n${e.stack || ""}`));
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()} @ ${m.location()?.url || ""}`); });
  await page.goto(url);
  await page.waitForFunction((types) => window.app?.graph && types.every((t) => window.LiteGraph?.registered_node_types?.[t]),
                             OUR_NODES, { timeout: 90000 });
  await page.waitForTimeout(1000);

  const dialogs = () => page.evaluate(() => [...document.querySelectorAll(".p-dialog")]
    .filter((d) => d.offsetParent !== null).map((d) => d.innerText.slice(0, 2000)));

  for (const file of readdirSync(workflowDir).filter((f) => f.endsWith(".json")).sort()) {
    const workflow = JSON.parse(readFileSync(join(workflowDir, file), "utf8"));
    const entry = { errors: [] };
    errors = entry.errors;
    Object.assign(entry, await page.evaluate(async ([workflow, name]) => {
      const missing = workflow.nodes.map((n) => n.type).filter((t) => !(t in window.LiteGraph.registered_node_types));
      await window.app.loadGraphData(workflow, true, true, name);
      await new Promise((r) => setTimeout(r, 500));
      const nodes = window.app.graph.nodes;
      return {
        missing,
        node_count: nodes.length,
        expected_node_count: workflow.nodes.length,
        nodes_with_errors: nodes.filter((n) => n.has_errors).map((n) => n.type),
        prompt: (await window.app.graphToPrompt()).output,
      };
    }, [workflow, file.replace(/\.json$/, "")]));
    // the missing-models check is asynchronous (it lists the model folders first): give its dialog time to open
    const names = workflow.nodes.some((n) => n.properties?.models?.length);
    if (names) await page.waitForSelector(".p-dialog", { state: "visible", timeout: 5000 }).catch(() => {});
    entry.dialogs = await dialogs();
    await page.keyboard.press("Escape"); // the graph itself in the screenshot (the templates' thumbnails)
    await page.evaluate(() => window.app.extensionManager?.command?.execute?.("Comfy.Canvas.FitView"));
    await page.waitForTimeout(500);
    await page.screenshot({ path: join(screenshotDir, file.replace(/\.json$/, ".png")) });
    if (standIns[file]) {
      Object.assign(entry, await runInPage(page, standIns[file]));
      // at 100%, the graph's top-left corner 16 px inside the canvas (which starts right of the side bar, below the menu)
      await page.evaluate(() => {
        const ds = window.app.canvas.ds;
        const left = Math.min(...window.app.graph.nodes.map((n) => n.pos[0]));
        const top = Math.min(...window.app.graph.nodes.map((n) => n.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT));
        ds.scale = 1;
        ds.offset = [16 - left, 16 - top];
        window.app.canvas.setDirty(true, true);
      });
      await page.waitForTimeout(1500); // the video and the previews render
      entry.after_run = await layout(page);
      await page.screenshot({ path: join(screenshotDir, file.replace(/\.json$/, "") + ".after_run.png") });
    }
    report.workflows[file] = entry;
  }

  // What dragging the nodes in from the node library does: create, add, read the widgets.
  errors = report.startup_errors;
  report.created = await page.evaluate((types) => {
    window.app.graph.clear();
    const created = {};
    types.forEach((type, i) => {
      const node = window.LiteGraph.createNode(type);
      node.pos = [100 + 450 * i, 100];
      window.app.graph.add(node);
      created[type] = {
        title: node.title,
        category: node.constructor.category,
        widgets: (node.widgets || []).map((w) => w.name),
        values: Object.fromEntries((node.widgets || []).filter((w) => w.name !== "status_report").map((w) => [w.name, w.value])),
        inputs: (node.inputs || []).map((s) => `${s.name}:${s.type}`),
        outputs: (node.outputs || []).map((s) => `${s.name}:${s.type}`),
      };
    });
    return created;
  }, OUR_NODES);
  // The Status node's web extension fills its text from GET /distrifusion/status.
  await page.waitForFunction(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "OfficialDistriFusionStatus");
    return node?.widgets?.find((w) => w.name === "status_report")?.value?.includes("Official DistriFusion Status");
  }, null, { timeout: 20000 }).catch(() => {});
  report.status_text = await page.evaluate(() => window.app.graph.nodes
    .find((n) => n.type === "OfficialDistriFusionStatus")?.widgets?.find((w) => w.name === "status_report")?.value ?? null);
  await page.evaluate(() => window.app.extensionManager?.command?.execute?.("Comfy.Canvas.FitView"));
  await page.waitForTimeout(500);
  // How much of the report shows: the node's size and its text box's size on screen, and the report's lines.
  report.status_box = await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "OfficialDistriFusionStatus");
    const widget = node?.widgets?.find((w) => w.name === "status_report");
    const el = widget?.inputEl ?? widget?.element;
    const scale = window.app.canvas?.ds?.scale ?? 1;
    return {
      size: node ? [...node.size] : null,
      text_height: el ? el.clientHeight / scale : null,
      text_scroll_height: el ? el.scrollHeight / scale : null,
      lines: (widget?.value ?? "").split("\n").length,
    };
  });
  report.created_prompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  await page.screenshot({ path: join(screenshotDir, "created_nodes.png") });

  // The template browser, as a user opens it: our category's thumbnails load and the titles read as names.
  const ours = "/workflow_templates/ComfyUI-WanVideo-DistriFusion/";
  report.template_requests = [];
  page.on("response", (r) => {
    if (r.url().includes(ours)) report.template_requests.push([r.status(), decodeURIComponent(r.url())]);
  });
  await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  await page.waitForTimeout(2000);
  await page.getByText("ComfyUI-WanVideo-DistriFusion", { exact: true }).first().click().catch(() => {});
  await page.waitForTimeout(3000);
  // the frontend fetches a thumbnail and shows it from a blob: URL, so look at the dialog's images; they load as they
  // scroll into view (and may be dropped once out of it): scroll the dialog's lists a screen at a time, noting each
  const images = () => page.evaluate(() => [...document.querySelectorAll(".p-dialog img")]
    .map((img) => ({ alt: img.alt, loaded: img.complete && img.naturalWidth > 0 })));
  const seen = new Map();
  const note = (list) => list.forEach((i) => seen.set(i.alt, (seen.get(i.alt) || false) || i.loaded));
  note(await images());
  for (let i = 0; i < 10; i++) {
    await page.evaluate(() => document.querySelectorAll(".p-dialog *").forEach((el) => {
      if (el.scrollHeight > el.clientHeight + 4) el.scrollTop += el.clientHeight / 2;
    }));
    await page.waitForTimeout(700);
    note(await images());
  }
  report.template_browser = {
    images: [...seen].map(([alt, loaded]) => ({ alt, loaded })),
    text: await page.evaluate(() => [...document.querySelectorAll(".p-dialog")].map((d) => d.innerText).join("\n")),
  };
  await page.screenshot({ path: join(screenshotDir, "template_browser.png") });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
