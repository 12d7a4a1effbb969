// LoRA Loop front-end: a live loss chart inside the TrainLoRA node, and text results (dataset summary, captions)
// shown on the nodes that produce them. Fed by the server's "loraloop.loss" events (nodes/sink.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const TRAIN_NODE = "LoRALoop_TrainLoRA";
const TEXT_NODES = ["LoRALoop_LoadDataset", "LoRALoop_Caption", "LoRALoop_TrainLoRA", "LoRALoop_SaveLoRA"];
const CHART_HEIGHT = 140;
const runs = new Map(); // node id -> {losses: number[], total, eta}

function smooth(values, window) {
  const out = [];
  let sum = 0;
  values.forEach((v, i) => {
    sum += v;
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  });
  return out;
}

function drawChart(ctx, run, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(x, y, w, h);
  const losses = run.losses.filter(Number.isFinite);
  ctx.fillStyle = "#ccc";
  ctx.font = "11px sans-serif";
  if (losses.length < 2) {
    ctx.fillText(losses.length ? `step 1: loss ${losses[0].toFixed(4)}` : "waiting for the first step…", x + 6, y + 16);
    ctx.restore();
    return;
  }
  const lo = Math.min(...losses), hi = Math.max(...losses) + 1e-9;
  const px = (i) => x + 4 + ((w - 8) * i) / (losses.length - 1);
  const py = (v) => y + h - 16 - ((h - 28) * (v - lo)) / (hi - lo);
  const line = (values, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
    ctx.stroke();
  };
  line(losses, "#666", 1);
  line(smooth(losses, Math.max(1, Math.floor(losses.length / 20))), "#4aa3ff", 2);
  const last = losses[losses.length - 1];
  const eta = run.eta > 0 ? ` · ETA ${Math.round(run.eta)}s` : "";
  ctx.fillStyle = "#ccc";
  ctx.fillText(`step ${losses.length}/${run.total} · loss ${last.toFixed(4)}${eta}`, x + 6, y + 12);
  ctx.fillText(`${lo.toPrecision(3)}–${hi.toPrecision(3)}`, x + 6, y + h - 4);
  ctx.restore();
}

// The chart is a widget of its own (fixed height), so the front-end lays the node's other widgets out around it:
// drawn over the node's bottom instead, it was covered by the progress text and the result that grow into that space.
function chartWidget() {
  return {
    name: "loraloop_chart",
    type: "loraloop_chart",
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, node, width, y) {
      const run = runs.get(String(node.id)) ?? { losses: [], total: 0, eta: 0 };
      drawChart(ctx, run, 8, y + 4, width - 16, CHART_HEIGHT);
    },
    computeSize(width) {
      return [width, CHART_HEIGHT + 8];
    },
  };
}

app.registerExtension({
  name: "loraloop.nodes",
  async setup() {
    api.addEventListener("loraloop.loss", ({ detail }) => {
      const id = String(detail.node);
      if (detail.reset || !runs.has(id)) runs.set(id, { losses: [], total: 0, eta: 0 });
      const run = runs.get(id);
      if (detail.step !== undefined) {
        run.losses[detail.step - 1] = detail.loss;
        run.total = detail.total;
        run.eta = detail.eta;
      }
      const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
      node?.setDirtyCanvas?.(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (TEXT_NODES.includes(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = message?.text?.join?.("\n");
        if (!text) return;
        let widget = this.widgets?.find((w) => w.name === "loraloop_result");
        if (!widget) {
          // a multiline, read-only text box (addWidget("text") is one line: longer results were cut off)
          widget = ComfyWidgets.STRING(this, "loraloop_result", ["STRING", { multiline: true }], app).widget;
          widget.serialize = false;
          widget.options.serialize = false;
          if (widget.element) widget.element.readOnly = true;
        }
        widget.value = text;
        this.setDirtyCanvas(true, true);
      };
    }
    if (nodeData.name === TRAIN_NODE) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        this.addCustomWidget(chartWidget());
        const [width, height] = this.computeSize();
        this.setSize([Math.max(width, 320), height]);
        return result;
      };
    }
  },
});
