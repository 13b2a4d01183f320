// Shows the DistriFusion status report on the "🎯 Official DistriFusion Status" node: the text the node
// returns when it runs, and the live report from GET /distrifusion/status while a prompt runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const STATUS_NODE = "OfficialDistriFusionStatus";
const POLL_MS = 2000;
const REPORT_SIZE = [520, 380]; // room for the whole report (about 16 lines) when the node comes from the library
const statusNodes = new Set();
let pollTimer = null;

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "status_report");
  if (!widget) {
    widget = ComfyWidgets.STRING(node, "status_report", ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not part of the saved workflow
    widget.options = { ...(widget.options ?? {}), serialize: false }; // nor of the API prompt
    const el = widget.inputEl ?? widget.element;
    if (el) {
      el.readOnly = true;
      el.style.fontFamily = "monospace";
      el.style.fontSize = "11px";
    }
    widget.value = "Run the graph (or queue this node) to see the DistriFusion status.";
  }
  return widget;
}

function showReport(node, text) {
  reportWidget(node).value = text;
  node.setDirtyCanvas?.(true, true);
}

async function refreshAll() {
  if (statusNodes.size === 0) return;
  try {
    const response = await api.fetchApi("/distrifusion/status");
    if (!response.ok) return;
    const report = await response.json();
    for (const node of statusNodes) showReport(node, report.text);
  } catch (error) {
    console.warn("DistriFusion status poll failed", error);
  }
}

function startPolling() {
  if (pollTimer === null) pollTimer = setInterval(refreshAll, POLL_MS);
  refreshAll();
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
  refreshAll(); // one last report: final step, seconds per step, errors
}

app.registerExtension({
  name: "WanVideo.DistriFusion.Status",
  async setup() {
    api.addEventListener("execution_start", startPolling);
    for (const done of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(done, stopPolling);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== STATUS_NODE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      reportWidget(this);
      // A workflow's saved size is applied after this (configure), so only a new node gets the default.
      this.setSize([Math.max(this.size[0], REPORT_SIZE[0]), Math.max(this.size[1], REPORT_SIZE[1])]);
      statusNodes.add(this);
      refreshAll();
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      statusNodes.delete(this);
      return onRemoved?.apply(this, arguments);
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showReport(this, message.text.join("\n"));
    };
  },
});
