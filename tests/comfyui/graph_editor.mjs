// Drives ComfyUI's graph editor in headless Chromium for test_graph_editor.py; prints one JSON report.
// usage: node graph_editor.mjs <server url> <workflow dir> <screenshot dir>
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
const [url, workflowDir, screenshotDir] = process.argv.slice(2);
const OUR_NODES = ["OfficialDistriFusionModelLoader", "OfficialDistriFusionSampler", "OfficialDistriFusionStatus"];

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
    .filter((d) => d.offsetParent !== null).map((d) => d.innerText.slice(0, 500)));

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
    entry.dialogs = await dialogs();
    await page.evaluate(() => window.app.extensionManager?.command?.execute?.("Comfy.Canvas.FitView"));
    await page.waitForTimeout(500);
    await page.screenshot({ path: join(screenshotDir, file.replace(/\.json$/, ".png")) });
    await page.keyboard.press("Escape");
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
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
