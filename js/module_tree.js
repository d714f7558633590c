// @inline tree_logic.js
// ^ jupyter_lora/widgets/tree.py replaces that line with js/tree_logic.js minus the word "export " at line starts
// (re.sub(r"^export ", "", text, flags=re.M)): anywidget loads a single module, so foldTree, matchSpec,
// toggleTarget, ... are plain top-level functions here. Nothing is imported; no network at run time.
// This file's own top-level names start with `jl` (plus `render`) so they never clash with tree_logic.js.
//
// The module tree of the model: a spec row (targets, preset buttons, layers), the error line, the folded tree with
// one checkbox per row, and a footer counting the selected modules. Python resolves the spec and sends back
// `selected`; typing highlights what the spec matches at once (jl-match), the traits follow after a short pause.

const JL_DEBOUNCE_MS = 120;
const JL_INDENT_PX = 14;

function jlEl(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function jlLayerHint(numLayers) {
  return numLayers > 0 ? `all (0–${numLayers - 1})` : "no repeated blocks";
}

function render({ model, el }) {
  const root = jlEl("div", "jl-module-tree");

  const spec = jlEl("div", "jl-spec");
  const targetsLabel = jlEl("label", "jl-field");
  const targetsInput = jlEl("input", "jl-targets");
  targetsInput.type = "text";
  targetsInput.spellcheck = false;
  targetsInput.autocomplete = "off";
  targetsInput.placeholder = "q_proj, v_proj · *.mlp.* · re:… · preset";
  targetsLabel.append(jlEl("span", "jl-field-name", "targets"), targetsInput);
  const presetBox = jlEl("span", "jl-presets");
  const layersLabel = jlEl("label", "jl-field");
  const layersInput = jlEl("input", "jl-layers");
  layersInput.type = "text";
  layersInput.spellcheck = false;
  layersInput.autocomplete = "off";
  layersLabel.append(jlEl("span", "jl-field-name", "layers"), layersInput);
  spec.append(targetsLabel, presetBox, layersLabel);

  const errorLine = jlEl("div", "jl-error");
  errorLine.setAttribute("role", "status");
  errorLine.setAttribute("aria-live", "polite");
  const tree = jlEl("div", "jl-tree");
  tree.setAttribute("role", "tree");
  const footer = jlEl("div", "jl-footer");
  const countLine = jlEl("span", "jl-count");
  footer.append(countLine);
  root.append(spec, errorLine, tree, footer);
  el.append(root);

  // ------------------------------------------------------------------ state
  let display = null; // display tree (foldTree)
  let byPath = new Map(); // path -> raw node + block position (indexNodes)
  let adaptable = []; // raw nodes of the adaptable modules, model order
  let defaults = new Set(); // keys open by default
  const overrides = new Map(); // key -> open, what the user toggled
  let rows = new Map(); // key -> {row, caret, check, frac, node} for the rows on screen
  let selectedSet = new Set();
  let marks = { hits: new Set(), inside: new Set() };
  let layerList = null; // parsed layers field (null = all or invalid)
  const timers = { targets: null, layers: null };
  let awaiting = false; // a spec was sent and Python's `selected` for it has not come back yet
  const inputs = { targets: targetsInput, layers: layersInput };

  const isOpen = (key) => (overrides.has(key) ? overrides.get(key) : defaults.has(key));

  // ------------------------------------------------------------------ rows
  function buildRow(node) {
    const row = jlEl("div", "jl-node");
    row.dataset.key = node.key;
    row.setAttribute("role", "treeitem");
    row.setAttribute("aria-level", String(node.depth + 1));
    row.style.paddingLeft = `${node.depth * JL_INDENT_PX + 4}px`;
    if (node.kind) row.classList.add("jl-adaptable");
    if (node.folded) row.classList.add("jl-folded");
    let caret;
    if (node.children.length) {
      caret = jlEl("button", "jl-caret", isOpen(node.key) ? "▾" : "▸");
      caret.type = "button";
      caret.setAttribute("aria-label", isOpen(node.key) ? "collapse" : "expand");
      row.setAttribute("aria-expanded", String(isOpen(node.key)));
    } else caret = jlEl("span", "jl-caret jl-leaf");
    const check = jlEl("input", "jl-check");
    check.type = "checkbox";
    check.disabled = node.targetPaths.length === 0;
    check.title = check.disabled
      ? "cannot take LoRA"
      : `${node.targetPaths.length} adaptable module${node.targetPaths.length === 1 ? "" : "s"}`;
    const label = jlEl("span", "jl-label", node.label);
    label.title =
      node.paths.length > 1
        ? `${node.paths.length} modules: ${node.paths[0]} … ${node.paths[node.paths.length - 1]}`
        : node.paths[0] || "";
    const type = jlEl("span", "jl-type", node.type === node.label ? "" : node.type); // the root is named by its class
    const shape = jlEl("span", "jl-shape", node.shape);
    const frac = jlEl("span", "jl-frac");
    const params = jlEl("span", "jl-params", formatCount(node.params));
    params.title = `${node.params.toLocaleString("en-US")} parameters`;
    row.append(caret, check, label, type, shape, frac, params);
    return { row, caret, check, frac, node };
  }

  function renderRows(focusKey) {
    rows = new Map();
    const frag = document.createDocumentFragment();
    for (const node of visibleRows(display, isOpen)) {
      const entry = buildRow(node);
      rows.set(node.key, entry);
      frag.append(entry.row);
    }
    tree.replaceChildren(frag);
    applyStates();
    if (focusKey !== undefined) {
      const entry = rows.get(focusKey);
      if (entry && entry.caret.focus) entry.caret.focus();
    }
  }

  function applyStates() {
    for (const { row, check, frac, node } of rows.values()) {
      const state = selectionState(node, selectedSet);
      row.classList.toggle("jl-selected", state === "all");
      row.classList.toggle("jl-partial", state === "some");
      check.checked = state === "all";
      check.indeterminate = state === "some";
      row.setAttribute("aria-selected", String(state === "all"));
      row.classList.toggle("jl-match", marks.hits.has(node.key));
      row.classList.toggle("jl-match-inside", !isOpen(node.key) && marks.inside.has(node.key));
      let n = 0;
      if (state === "some") for (const p of node.targetPaths) if (selectedSet.has(p)) n++;
      frac.textContent = state === "some" ? `${n}/${node.targetPaths.length}` : "";
    }
  }

  function updateFooter() {
    let params = 0;
    for (const p of selectedSet) params += (byPath.get(p) || {}).params || 0;
    const n = selectedSet.size;
    countLine.dataset.count = String(n);
    countLine.textContent = footerText(n, adaptable.length, params);
    countLine.title = n ? `${params.toLocaleString("en-US")} parameters in the base weights of the selected modules` : "";
  }

  // ------------------------------------------------------------------ spec feedback
  function refreshLayers() {
    const numLayers = model.get("num_layers") || 0;
    layersInput.placeholder = jlLayerHint(numLayers);
    try {
      layerList = parseLayers(layersInput.value, numLayers);
      layersInput.classList.remove("jl-invalid");
      layersInput.title = "layer indices and ranges, e.g. 0-11, 20";
    } catch (err) {
      layerList = null;
      layersInput.classList.add("jl-invalid");
      layersInput.title = err.message;
    }
  }

  function refreshMatches() {
    const result = matchSpec(targetsInput.value, adaptable, layerList);
    marks = highlight(display, result.paths);
    const problems = [];
    if (result.invalid.length) problems.push(`not a valid pattern: ${result.invalid.join(", ")}`);
    if (result.unmatched.length) problems.push(`matches nothing: ${result.unmatched.join(", ")}`);
    targetsInput.classList.toggle("jl-invalid", result.invalid.length > 0);
    targetsInput.title = problems.join("; ");
    const active = result.presets.length === 1 && splitSpec(targetsInput.value).length === 1 ? result.presets[0] : null;
    for (const button of presetBox.children) button.classList.toggle("jl-active", button.dataset.preset === active);
    applyStates();
  }

  // ------------------------------------------------------------------ traits -> view
  function onStructure() {
    const nodes = model.get("nodes") || [];
    const blockLists = model.get("block_lists") || [];
    display = foldTree(nodes, blockLists);
    byPath = indexNodes(nodes, blockLists);
    adaptable = [];
    for (const raw of nodes) if (raw.kind && raw.path) adaptable.push(raw);
    defaults = defaultExpanded(display);
    selectedSet = pythonSelection();
    refreshLayers();
    renderRows();
    refreshMatches();
    updateFooter();
  }

  // Python's selection, limited to modules of the current tree (the two traits may arrive in either order).
  function pythonSelection() {
    return new Set((model.get("selected") || []).filter((p) => (byPath.get(p) || {}).kind));
  }

  function onSelected() {
    awaiting = false;
    selectedSet = pythonSelection();
    applyStates();
    updateFooter();
  }

  function syncInput(name) {
    const value = model.get(name) ?? "";
    if (timers[name] === null && inputs[name].value !== value) inputs[name].value = value;
  }

  function onTargets() {
    syncInput("targets");
    refreshMatches();
  }

  function onLayers() {
    syncInput("layers");
    refreshLayers();
    refreshMatches();
  }

  function onError() {
    awaiting = false;
    const message = model.get("error") || "";
    errorLine.textContent = message;
    errorLine.hidden = message === "";
  }

  function onPresets() {
    presetBox.replaceChildren();
    for (const name of model.get("presets") || []) {
      const button = jlEl("button", "jl-preset", name);
      button.type = "button";
      button.dataset.preset = name;
      button.title = `targets: ${name}`;
      presetBox.append(button);
    }
    refreshMatches();
  }

  function onNumLayers() {
    refreshLayers();
    refreshMatches();
  }

  // ------------------------------------------------------------------ view -> traits
  function commit(name) {
    clearTimeout(timers[name]);
    timers[name] = null;
    const value = inputs[name].value;
    if (model.get(name) !== value) {
      model.set(name, value);
      model.save_changes();
      awaiting = true;
    }
  }

  function schedule(name) {
    clearTimeout(timers[name]);
    timers[name] = setTimeout(() => commit(name), JL_DEBOUNCE_MS);
  }

  function onTargetsInput() {
    refreshMatches();
    schedule("targets");
  }

  function onLayersInput() {
    refreshLayers();
    refreshMatches();
    schedule("layers");
  }

  function onKeydown(event) {
    if (event.key !== "Enter") return;
    if (event.target === targetsInput) commit("targets");
    else if (event.target === layersInput) commit("layers");
  }

  // Leaving a field (e.g. to click Inject) sends what was typed at once, not after the debounce.
  function onTargetsBlur() {
    if (timers.targets) commit("targets");
  }

  function onLayersBlur() {
    if (timers.layers) commit("layers");
  }

  function onPresetClick(event) {
    const button = event.target.closest(".jl-preset");
    if (!button) return;
    targetsInput.value = button.dataset.preset;
    commit("targets");
    refreshMatches();
  }

  function toggleOpen(key) {
    overrides.set(key, !isOpen(key));
    renderRows(key);
  }

  function onTreeClick(event) {
    const rowEl = event.target.closest(".jl-node");
    if (!rowEl || !tree.contains(rowEl)) return;
    const entry = rows.get(rowEl.dataset.key);
    if (!entry) return;
    const target = event.target;
    if (target.classList.contains("jl-check")) {
      if (target.disabled) return;
      const pending =
        awaiting || timers.targets !== null || targetsInput.value !== (model.get("targets") ?? "");
      const text = toggleTarget(targetsInput.value, model.get("selected") || [], entry.node, byPath, {
        layers: layerList,
        preferText: pending,
      });
      targetsInput.value = text;
      // Show the result now (the same rules Python applies); Python's `selected` replaces it when it arrives.
      selectedSet = matchSpec(text, adaptable, layerList).paths;
      commit("targets");
      refreshMatches();
      updateFooter();
      return;
    }
    if (entry.node.children.length && (target.closest(".jl-caret") || target.classList.contains("jl-label"))) {
      toggleOpen(entry.node.key);
    }
  }

  function onTreeKeydown(event) {
    const rowEl = event.target.closest(".jl-node");
    if (!rowEl) return;
    const entry = rows.get(rowEl.dataset.key);
    if (!entry || !entry.node.children.length) return;
    const open = isOpen(entry.node.key);
    if ((event.key === "ArrowRight" && !open) || (event.key === "ArrowLeft" && open)) {
      event.preventDefault();
      toggleOpen(entry.node.key);
    }
  }

  const domListeners = [
    [targetsInput, "input", onTargetsInput],
    [layersInput, "input", onLayersInput],
    [targetsInput, "keydown", onKeydown],
    [layersInput, "keydown", onKeydown],
    [targetsInput, "blur", onTargetsBlur],
    [layersInput, "blur", onLayersBlur],
    [presetBox, "click", onPresetClick],
    [tree, "click", onTreeClick],
    [tree, "keydown", onTreeKeydown],
  ];
  for (const [target, type, fn] of domListeners) target.addEventListener(type, fn);

  const modelListeners = [
    ["change:nodes", onStructure],
    ["change:block_lists", onStructure],
    ["change:selected", onSelected],
    ["change:targets", onTargets],
    ["change:layers", onLayers],
    ["change:error", onError],
    ["change:presets", onPresets],
    ["change:num_layers", onNumLayers],
  ];
  for (const [name, fn] of modelListeners) model.on(name, fn);

  targetsInput.value = model.get("targets") ?? "";
  layersInput.value = model.get("layers") ?? "";
  onPresets();
  onError();
  onStructure();

  return () => {
    for (const name of ["targets", "layers"]) {
      if (timers[name] !== null) {
        try {
          commit(name); // keep what was typed
        } catch {
          clearTimeout(timers[name]);
        }
      }
    }
    for (const [name, fn] of modelListeners) model.off(name, fn);
    for (const [target, type, fn] of domListeners) target.removeEventListener(type, fn);
    root.remove();
  };
}

export default { render };
