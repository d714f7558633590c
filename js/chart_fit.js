// Keeps a plotly FigureWidget's chart as wide as the box it sits in.
//
// plotly's FigureWidget (an anywidget) draws its chart before the chart is in the page, where it has no width yet:
// plotly then falls back to its default 700 px and never measures again, so in a narrower output area the chart's
// right side is cut off, and in a wider one it stays 700 px. (plotly's Plots.resize does not help: once the
// height is changed, as when the GPU memory panel appears, plotly pins the width it had, and Plots.resize leaves a
// chart with a width and a height alone.) This widget sits beside the chart in the same box and sets the chart's
// width to the box's whenever the box changes size (the chart is put in, the window or a side panel is resized)
// and whenever plotly has drawn the chart. The width is this view's own: not reported to the kernel (the flag
// plotly's view puts on the changes that come from the kernel), so views of different widths do not fight.

// chart -> "width from drawn width" of its last relayout: asked once for each, so a width plotly will not take
// (narrower than its minimum) is not asked for again and again
const asked = new WeakMap();

function fit(chart) {
  // plotly's bundle, loaded by the FigureWidget, sets window.Plotly
  const Plotly = globalThis.Plotly;
  const drawn = chart._fullLayout;
  const width = chart.clientWidth;
  if (!Plotly || !drawn || width <= 0 || Math.abs(drawn.width - width) < 1) return;
  const request = `${width} from ${drawn.width}`;
  if (asked.get(chart) === request) return;
  asked.set(chart, request);
  Plotly.relayout(chart, { width, _doNotReportToPy: true });
}

export default {
  render({ el }) {
    el.classList.add("jl-chart-fit");
    el.style.height = "0";
    el.style.overflow = "hidden";
    const hooked = new Map(); // chart -> its listener for plotly's redraws
    let box = null;
    const fitAll = () => {
      if (!box) return;
      for (const chart of box.querySelectorAll(":scope > .js-plotly-plot")) {
        if (!hooked.has(chart) && typeof chart.on === "function") {
          const again = () => fit(chart);
          chart.on("plotly_afterplot", again);
          hooked.set(chart, again);
        }
        fit(chart);
      }
    };
    const observer = new ResizeObserver(() => {
      if (!box && el.parentElement) {
        box = el.parentElement; // the box grows when the chart is put in, and follows the output area's width
        observer.observe(box);
      }
      fitAll();
    });
    observer.observe(el);
    return () => {
      observer.disconnect();
      for (const [chart, again] of hooked) {
        if (typeof chart.removeListener === "function") chart.removeListener("plotly_afterplot", again);
      }
      hooked.clear();
    };
  },
};
