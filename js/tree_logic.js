// Pure logic of the module-tree widget: no DOM, no imports, importable by `node --test` and by the browser.
//
// jupyter_lora/widgets/tree.py inlines this file into module_tree.js at its first line (the @inline marker),
// removing the word "export " at the start of each line (anywidget loads one module string). So in this file:
// no `import`, no `export default`, no `export { ... }`, no line inside a string that starts with "export ", and
// no top-level name that module_tree.js also declares (its own names start with `jl`).
//
// Display nodes (what foldTree returns):
//   {key, label, type, params, kind, shape, children, paths, folded, group, depth, path, count, targetPaths}
//   key          unique and stable: the real path, or "<block list>.*" / "<block list>.*.<relative path>" when folded
//   paths        the real module paths the row stands for (one, or one per repeated block when folded)
//   targetPaths  every adaptable real path at or under the row (what its checkbox selects)
//   folded       the row stands for the same module in every block; group: it is the block list's row itself
//   path         the real path (null for folded rows); count: number of blocks (group rows, else 1)

/** Target presets, resolved by Python only (mirrors jupyter_lora.core.targets.PRESETS; "all" = "all-linear"). */
export const PRESETS = ["qv", "attention", "mlp", "all-linear"];

// ------------------------------------------------------------------------------------------------- formatting

/** 1234567 -> "1.23M", 45100 -> "45.1K", 7e9 -> "7.00B", 999 -> "999" (three significant digits). */
export function formatCount(n) {
  const value = Number(n);
  if (!Number.isFinite(value)) return String(n);
  const sign = value < 0 ? "-" : "";
  let abs = Math.abs(value);
  const units = [
    ["", 1],
    ["K", 1e3],
    ["M", 1e6],
    ["B", 1e9],
    ["T", 1e12],
  ];
  if (abs < 1000) return sign + String(Math.round(abs));
  let i = units.length - 1;
  while (i > 1 && abs < units[i][1]) i--;
  let text = (abs / units[i][1]).toPrecision(3);
  if (Number(text) >= 1000 && i < units.length - 1) {
    i++; // 999,999 rounds to 1000K: say 1.00M
    text = (abs / units[i][1]).toPrecision(3);
  }
  if (text.includes("e")) text = (abs / units[i][1]).toFixed(0); // beyond T
  return sign + text + units[i][0];
}

/** Bytes in binary units, like jupyter_lora.display.fmt_bytes: 512 -> "512 B", 1610612736 -> "1.5 GiB". */
export function formatBytes(n) {
  let value = Number(n);
  if (!Number.isFinite(value)) return String(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  for (const unit of units) {
    if (Math.abs(value) < 1024 || unit === "TiB") {
      if (unit === "B") return `${Math.round(value)} B`;
      if (Math.abs(value) < 100) return `${Number(value.toPrecision(3))} ${unit}`;
      return `${Math.round(value)} ${unit}`;
    }
    value /= 1024;
  }
  return String(n); // not reached
}

/**
 * The tree's footer: how many adaptable modules the spec selects and how many parameters their base weights hold.
 * Those are the frozen weights LoRA adapts, not the trainable count (the panel's summary shows that), so the
 * text says so: "4 of 16 adaptable modules selected, holding 3.07K frozen base parameters".
 */
export function footerText(selected, adaptable, baseParams) {
  const modules = `${selected} of ${adaptable} adaptable module${adaptable === 1 ? "" : "s"} selected`;
  return selected ? `${modules}, holding ${formatCount(baseParams)} frozen base parameters` : modules;
}

// ------------------------------------------------------------------------------------------------- spec text

/** "q_proj, re:x{1,2}" -> ["q_proj", "re:x{1,2}"]: split on commas outside ([{ }]), trimmed, empties dropped. */
export function splitSpec(text) {
  const out = [];
  let depth = 0;
  let current = "";
  for (const ch of String(text ?? "")) {
    if (ch === "(" || ch === "[" || ch === "{") depth++;
    else if (ch === ")" || ch === "]" || ch === "}") depth = Math.max(0, depth - 1);
    if (ch === "," && depth === 0) {
      out.push(current.trim());
      current = "";
    } else current += ch;
  }
  out.push(current.trim());
  return out.filter((item) => item !== "");
}

/** The preset an item names ("attention", "All_Linear", "all" -> "all-linear"), else null. As Python reads it. */
export function presetName(item) {
  const lowered = String(item).toLowerCase().replace(/_/g, "-");
  if (lowered === "all") return "all-linear";
  return PRESETS.includes(lowered) ? lowered : null;
}

/** Escape text for use as a literal inside a RegExp (valid for Python's re too). */
export function escapeRegExp(text) {
  return String(text).replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Python fnmatch.translate for one glob, as a JS RegExp source (no anchors). * and ? also match dots. */
export function globSource(pattern) {
  let out = "";
  let i = 0;
  let lastStar = false;
  const n = pattern.length;
  while (i < n) {
    const c = pattern[i++];
    if (c === "*") {
      if (!lastStar) out += ".*";
      lastStar = true;
      continue;
    }
    lastStar = false;
    if (c === "?") out += ".";
    else if (c === "[") {
      let j = i;
      if (j < n && pattern[j] === "!") j++;
      if (j < n && pattern[j] === "]") j++;
      while (j < n && pattern[j] !== "]") j++;
      if (j >= n) out += "\\["; // no closing bracket: a literal "["
      else {
        out += globClass(pattern, i, j);
        i = j + 1;
      }
    } else out += escapeRegExp(c);
  }
  return out;
}

// The bracket expression pattern[i:j] (between "[" and "]") as fnmatch translates it: ranges that run backwards
// are dropped ("[3-01]" is "[1]"), an empty set never matches, "[!]"-like negated empty sets match any character.
function globClass(pattern, i, j) {
  let stuff = pattern.slice(i, j);
  if (!stuff.includes("-")) stuff = stuff.replace(/\\/g, "\\\\");
  else {
    const chunks = [];
    let k = pattern[i] === "!" ? i + 2 : i + 1;
    for (;;) {
      k = pattern.indexOf("-", k);
      if (k < 0 || k >= j) break;
      chunks.push(pattern.slice(i, k));
      i = k + 1;
      k += 3;
    }
    const chunk = pattern.slice(i, j);
    if (chunk) chunks.push(chunk);
    else chunks[chunks.length - 1] += "-";
    for (let m = chunks.length - 1; m > 0; m--) {
      if (chunks[m - 1].slice(-1) > chunks[m][0]) {
        chunks[m - 1] = chunks[m - 1].slice(0, -1) + chunks[m].slice(1);
        chunks.splice(m, 1);
      }
    }
    stuff = chunks.map((part) => part.replace(/\\/g, "\\\\").replace(/-/g, "\\-")).join("-");
  }
  if (!stuff) return "(?!)";
  if (stuff === "!") return ".";
  if (stuff[0] === "!") stuff = "^" + stuff.slice(1);
  else if (stuff[0] === "^") stuff = "\\" + stuff;
  return `[${stuff.replace(/]/g, "\\]")}]`;
}

// Escapes Python's re knows (besides digits and punctuation); any other ASCII letter is an error there.
const PY_ESCAPES = "abBdDfnrstvwWxuAZ";

/**
 * A Python regex (the part after "re:") as a JS RegExp matching a whole path, as re.fullmatch does, or null when
 * Python would refuse it or JS cannot express it (atomic groups, possessive quantifiers, \U, \N{...}).
 * Translated: leading global flags (?imsx), \A and \Z, (?P<name>...) and (?P=name), (?#comments), "]" first in
 * a set, x{,n}; verbose mode drops the whitespace and comments.
 */
export function pythonRegExp(source) {
  let src = String(source);
  let flags = "";
  let verbose = false;
  const inline = /^\(\?([aiLmsux]+)\)/.exec(src); // leading global flags, e.g. (?i)
  if (inline) {
    const given = inline[1];
    if (given.includes("L") || (given.includes("a") && given.includes("u"))) return null; // refused for text
    for (const f of given) {
      if (f === "x") verbose = true;
      else if ("ims".includes(f) && !flags.includes(f)) flags += f;
    }
    src = src.slice(inline[0].length);
  }
  let out = "";
  let inSet = false;
  let setStart = false; // right after "[" or "[^": a "]" here is a literal
  let i = 0;
  const n = src.length;
  while (i < n) {
    const c = src[i];
    if (c === "\\") {
      const next = src[i + 1];
      if (next === undefined) return null;
      if (/[A-Za-z]/.test(next) && !PY_ESCAPES.includes(next)) return null; // "bad escape"
      if (next === "A" || next === "Z") {
        if (inSet) return null;
        out += next === "A" ? "^" : "$";
      } else out += c + next;
      setStart = false;
      i += 2;
      continue;
    }
    if (inSet) {
      if (c === "^" && setStart && out.endsWith("[")) out += c;
      else if (c === "]" && setStart) {
        out += "\\]";
        setStart = false;
      } else {
        if (c === "]") inSet = false;
        out += c;
        setStart = false;
      }
      i++;
      continue;
    }
    if (verbose && /\s/.test(c)) {
      i++;
      continue;
    }
    if (verbose && c === "#") {
      const end = src.indexOf("\n", i);
      i = end < 0 ? n : end + 1;
      continue;
    }
    if (c === "[") {
      inSet = true;
      setStart = true;
      out += c;
      i++;
      continue;
    }
    const rest = src.slice(i);
    if (rest.startsWith("(?#")) {
      const end = src.indexOf(")", i);
      if (end < 0) return null;
      i = end + 1;
      continue;
    }
    if (rest.startsWith("(?P<")) {
      out += "(?<";
      i += 4;
      continue;
    }
    const backref = /^\(\?P=(\w+)\)/.exec(rest);
    if (backref) {
      out += `\\k<${backref[1]}>`;
      i += backref[0].length;
      continue;
    }
    if (/^\(\?<[^=!]/.test(rest)) return null; // Python names groups only as (?P<name>...)
    const upTo = /^\{,(\d*)\}/.exec(rest);
    if (upTo) {
      out += `{0,${upTo[1]}}`;
      i += upTo[0].length;
      continue;
    }
    out += c;
    i++;
  }
  try {
    return new RegExp(`^(?:${out})$`, flags);
  } catch {
    return null;
  }
}

/** A predicate path -> bool for one spec item (not a preset), or null when the item is an invalid regex/glob. */
export function itemMatcher(item) {
  if (item.startsWith("re:")) {
    const re = pythonRegExp(item.slice(3));
    return re && ((path) => re.test(path));
  }
  if (/[*?[]/.test(item)) {
    let re;
    try {
      // fnmatch(path, glob) or fnmatch(path, "*." + glob)
      re = new RegExp(`^(?:.*\\.)?(?:${globSource(item)})$`);
    } catch {
      return null;
    }
    return (path) => re.test(path);
  }
  const dotted = "." + item;
  return (path) => path === item || path.endsWith(dotted);
}

function adaptableNodesOf(paths) {
  const out = [];
  for (const p of paths || []) {
    if (typeof p === "string") {
      if (p) out.push({ path: p, layer: null });
    } else if (p && p.kind && p.path) out.push(p);
  }
  return out;
}

/**
 * What the tree highlights for a spec: the adaptable paths that `text` selects inside the `layers` blocks, by the
 * rules of Python's resolve_targets. Presets are resolved by Python only (they depend on the model's task heads
 * and PEFT's per-architecture defaults): they are reported, not expanded. `exclude` is Python's alone too.
 * `paths`: raw nodes (those with kind "" are skipped; `layer` is read from them), or adaptable paths when
 * `layers` is null. `layers`: indices from parseLayers (null = every layer).
 * Returns {paths: Set, presets: [normalized names], invalid: [items that do not compile], unmatched: [items that
 * select no adaptable module, in any layer]}.
 */
export function matchSpec(text, paths, layers = null) {
  const candidates = adaptableNodesOf(paths);
  const keep = layers ? new Set(layers) : null;
  const result = { paths: new Set(), presets: [], invalid: [], unmatched: [] };
  for (const item of splitSpec(text)) {
    const preset = presetName(item);
    if (preset) {
      if (!result.presets.includes(preset)) result.presets.push(preset);
      continue;
    }
    const test = itemMatcher(item);
    if (!test) {
      result.invalid.push(item);
      continue;
    }
    let hit = false;
    for (const node of candidates) {
      if (test(node.path)) {
        hit = true;
        if (!keep || keep.has(node.layer)) result.paths.add(node.path);
      }
    }
    if (!hit) result.unmatched.push(item);
  }
  return result;
}

/**
 * "0-11, 20" -> [0, 1, ..., 11, 20] (sorted, unique), like jupyter_lora.core.targets.parse_layers: ranges a-b,
 * a:b or a..b (inclusive), a single negative index counts from the end. Blank -> null (all layers).
 * Throws an Error whose message says what to write instead.
 */
export function parseLayers(text, numLayers) {
  const value = String(text ?? "").trim();
  if (!value) return null;
  if (!numLayers) {
    throw new Error(
      `layers was given (${value}) but this model has no repeated layer blocks to choose from. ` +
        "Clear layers, or select modules by name in targets.",
    );
  }
  const indices = new Set();
  for (const raw of value.split(",")) {
    const item = raw.trim();
    if (!item) continue;
    const m = /^\s*(-?\d+)\s*(?:(?:-|:|\.\.)\s*(-?\d+)\s*)?$/.exec(item);
    if (!m) {
      throw new Error(
        `layers item "${item}" is not an index or a range; write e.g. 0-11, 20 ` +
          `(the model has layers 0-${numLayers - 1}).`,
      );
    }
    let lo = Number(m[1]);
    let hi = m[2] !== undefined ? Number(m[2]) : lo;
    if (lo < 0 && hi === lo) lo = hi = numLayers + lo;
    if (lo > hi) throw new Error(`layers range "${item}" runs backwards; write it low-high, e.g. ${hi}-${lo}.`);
    if (lo < 0 || hi >= numLayers) {
      throw new Error(
        `layers "${item}" is out of range: this model has ${numLayers} layers, numbered 0-${numLayers - 1}.`,
      );
    }
    for (let k = lo; k <= hi; k++) indices.add(k);
  }
  return [...indices].sort((a, b) => a - b);
}

// ------------------------------------------------------------------------------------------------- the tree

function newDisplayNode(key, label, depth) {
  return {
    key,
    label,
    type: "",
    params: 0,
    kind: "",
    shape: "",
    children: [],
    paths: [],
    folded: false,
    group: false,
    depth,
    path: null,
    count: 1,
    targetPaths: [],
  };
}

function addUnique(list, value) {
  if (value && !list.includes(value)) list.push(value);
}

/**
 * Raw pre-order nodes -> display tree. Each container named in `blockLists` becomes one folded group row
 * ("layers.0–31 ×32") whose children mirror the blocks' structure (the union over blocks, in first-seen order),
 * with params summed over the blocks and `paths` listing the real path in every block. Returns null for no nodes.
 */
export function foldTree(nodes, blockLists) {
  if (!nodes || nodes.length === 0) return null;
  const childrenOf = new Map();
  let rootRaw = null;
  for (const raw of nodes) {
    if (raw.parent === null || raw.parent === undefined || raw.parent < 0) {
      if (rootRaw === null) rootRaw = raw;
      continue;
    }
    let list = childrenOf.get(raw.parent);
    if (!list) childrenOf.set(raw.parent, (list = []));
    list.push(raw);
  }
  if (rootRaw === null) rootRaw = nodes[0];
  const folds = new Set(blockLists || []);
  const adaptable = new Set();
  for (const raw of nodes) if (raw.kind && raw.path) adaptable.add(raw.path);

  const fold = (listRaw, blocks, depth) => {
    const base = listRaw.path ? `${listRaw.path}.*` : "*";
    const head = listRaw.path ? `${listRaw.name}.` : "";
    const first = blocks[0].name;
    const last = blocks[blocks.length - 1].name;
    const range = blocks.length > 1 ? `${first}–${last}` : first;
    const group = newDisplayNode(base, `${head}${range} ×${blocks.length}`, depth);
    group.folded = true;
    group.group = true;
    group.count = blocks.length;
    const byRel = new Map([["", { node: group, types: [], shapes: [] }]]);
    const visit = (raw, rel, parentRel) => {
      let entry = byRel.get(rel);
      if (!entry) {
        const parent = byRel.get(parentRel);
        const node = newDisplayNode(`${base}.${rel}`, raw.name, parent.node.depth + 1);
        node.folded = true;
        entry = { node, types: [], shapes: [] };
        byRel.set(rel, entry);
        parent.node.children.push(node);
      }
      const node = entry.node;
      node.paths.push(raw.path);
      node.params += raw.params || 0;
      if (!node.kind && raw.kind) node.kind = raw.kind;
      addUnique(entry.types, raw.type);
      addUnique(entry.shapes, raw.shape);
      for (const child of childrenOf.get(raw.id) || []) {
        visit(child, rel ? `${rel}.${child.name}` : child.name, rel);
      }
    };
    for (const block of blocks) visit(block, "", null);
    for (const { node, types, shapes } of byRel.values()) {
      node.type = types.join(" | ");
      node.shape = shapes.join(" | ");
    }
    return group;
  };

  const build = (raw, depth) => {
    const kids = childrenOf.get(raw.id) || [];
    if (kids.length && folds.has(raw.path)) return fold(raw, kids, depth);
    const node = newDisplayNode(raw.path, raw.name || raw.type || "(model)", depth);
    node.type = raw.type || "";
    node.params = raw.params || 0;
    node.kind = raw.kind || "";
    node.shape = raw.shape || "";
    node.path = raw.path;
    node.paths = [raw.path];
    for (const kid of kids) node.children.push(build(kid, depth + 1));
    return node;
  };

  const collect = (node) => {
    const own = node.kind ? node.paths.filter((p) => adaptable.has(p)) : [];
    let all = own;
    for (const child of node.children) {
      const below = collect(child);
      if (below.length) all = all.concat(below);
    }
    node.targetPaths = all;
    return all;
  };

  const tree = build(rootRaw, 0);
  collect(tree);
  return tree;
}

/** Walk a display tree in pre-order, calling fn(node, parent). */
export function walkTree(root, fn) {
  if (!root) return;
  const stack = [[root, null]];
  while (stack.length) {
    const [node, parent] = stack.pop();
    fn(node, parent);
    for (let i = node.children.length - 1; i >= 0; i--) stack.push([node.children[i], node]);
  }
}

/**
 * Keys of the rows open at first: everything above depth 2, the folded groups and the folded rows inside them
 * that contain something adaptable, and the ancestors of folded groups (so a deep block list is in view).
 */
export function defaultExpanded(root) {
  const open = new Set();
  const visit = (node, ancestors) => {
    if (!node.children.length) return;
    if (node.depth < 2 || (node.folded && node.targetPaths.length)) open.add(node.key);
    if (node.group) for (const key of ancestors) open.add(key);
    ancestors.push(node.key);
    for (const child of node.children) visit(child, ancestors);
    ancestors.pop();
  };
  if (root) visit(root, []);
  return open;
}

/** Rows to show, in order: the root and every node whose ancestors are all expanded. `expanded`: Set or key -> bool. */
export function visibleRows(root, expanded) {
  const isOpen = typeof expanded === "function" ? expanded : (key) => expanded.has(key);
  const rows = [];
  const visit = (node) => {
    rows.push(node);
    if (node.children.length && isOpen(node.key)) for (const child of node.children) visit(child);
  };
  if (root) visit(root);
  return rows;
}

/**
 * Which rows a set of matched paths lights up: `hits` = keys of rows that stand for a matched path themselves,
 * `inside` = keys of rows with a matched row somewhere below (to mark collapsed ones).
 */
export function highlight(root, matched) {
  const hits = new Set();
  const inside = new Set();
  if (!root || !matched || matched.size === 0) return { hits, inside };
  const visit = (node) => {
    let below = false;
    for (const child of node.children) if (visit(child)) below = true;
    if (below) inside.add(node.key);
    const own = node.kind !== "" && node.paths.some((p) => matched.has(p));
    if (own) hits.add(node.key);
    return own || below;
  };
  visit(root);
  return { hits, inside };
}

/** "all" | "some" | "none" of a row's adaptable paths are in `selected` (a Set); "empty" when it has none. */
export function selectionState(node, selected) {
  const paths = node.targetPaths || [];
  if (paths.length === 0) return "empty";
  let n = 0;
  for (const p of paths) if (selected.has(p)) n++;
  return n === 0 ? "none" : n === paths.length ? "all" : "some";
}

// ------------------------------------------------------------------------------------------------- selection → spec

/** Where a path sits relative to the block lists: {block: list path or null, index: block name, rel: path in block}. */
export function blockOf(path, blockLists) {
  for (const list of blockLists || []) {
    const head = list ? `${list}.` : "";
    if (path !== list && path.startsWith(head)) {
      const rest = path.slice(head.length);
      const dot = rest.indexOf(".");
      return dot < 0
        ? { block: list, index: rest, rel: "" }
        : { block: list, index: rest.slice(0, dot), rel: rest.slice(dot + 1) };
    }
  }
  return { block: null, index: null, rel: null };
}

/** Map path -> raw node plus {block, index, rel} (see blockOf): the `nodesByPath` that toggleTarget takes. */
export function indexNodes(nodes, blockLists) {
  const byPath = new Map();
  for (const raw of nodes || []) byPath.set(raw.path, { ...raw, ...blockOf(raw.path, blockLists) });
  return byPath;
}

// Block position of a node from a plain path -> node map (no blockLists): the outermost ancestor with a layer.
function blockOfNode(path, byPath) {
  const node = byPath.get(path);
  if (node && node.block !== undefined) return { block: node.block, rel: node.rel };
  if (!node || node.layer === null || node.layer === undefined) return { block: null, rel: null };
  const parts = path.split(".");
  for (let i = 1; i <= parts.length; i++) {
    const up = byPath.get(parts.slice(0, i).join("."));
    if (up && up.layer !== null && up.layer !== undefined) {
      const k = parts[i - 1] === String(up.layer) ? i : i + 1; // the block node itself, or its child
      return { block: parts.slice(0, k - 1).join("."), rel: parts.slice(k).join(".") };
    }
  }
  return { block: null, rel: null };
}

/**
 * The spec text that selects exactly `chosen` (a Set of adaptable paths), written as keys in model order:
 * a module inside repeated blocks, selected in every block the layers filter lets through, is written once by the
 * shortest dotted suffix that selects exactly that module in every block ("q_proj"; "EncDecAttention.q" where a bare
 * "q" would also take T5's other q's), else "<block list>.*.<path in block>"; anything else by its full path
 * ("lm_head"; "re:<escaped path>" if that path is also a suffix of another).
 * options.layers: the layer indices of the `layers` field (null = all).
 */
export function specForPaths(chosen, nodesByPath, options = {}) {
  const byPath = nodesByPath instanceof Map ? nodesByPath : new Map(Object.entries(nodesByPath || {}));
  const ordered = [];
  for (const node of byPath.values()) if (node.kind && node.path) ordered.push(node);
  ordered.sort((a, b) => (a.id ?? 0) - (b.id ?? 0));
  const suffixCount = new Map(); // dotted suffix -> how many adaptable paths end with it (or equal it)
  for (const { path } of ordered) {
    const parts = path.split(".");
    for (let k = 1; k <= parts.length; k++) {
      const suffix = parts.slice(parts.length - k).join(".");
      suffixCount.set(suffix, (suffixCount.get(suffix) || 0) + 1);
    }
  }
  const layerSet = options.layers ? new Set(options.layers) : null;
  const allowed = (node) => !layerSet || layerSet.has(node.layer);
  const groups = new Map(); // "block\0rel" -> {block, rel, members: [node]}
  const groupOf = new Map(); // path -> group
  for (const node of ordered) {
    const { block, rel } = blockOfNode(node.path, byPath);
    if (block === null || block === undefined) continue;
    const id = `${block}\u0000${rel}`;
    let group = groups.get(id);
    if (!group) groups.set(id, (group = { block, rel, members: [] }));
    group.members.push(node);
    groupOf.set(node.path, group);
  }
  const exactKey = (path) => (suffixCount.get(path) === 1 ? path : `re:${escapeRegExp(path)}`);
  const groupKey = (group) => {
    const n = group.members.length;
    const parts = group.rel ? group.rel.split(".") : [];
    for (let k = 1; k <= parts.length; k++) {
      const suffix = parts.slice(parts.length - k).join(".");
      if (suffixCount.get(suffix) === n) return suffix;
    }
    const head = group.block ? `${group.block}.*` : "*";
    const glob = group.rel ? `${head}.${group.rel}` : head;
    const test = itemMatcher(glob);
    let hits = 0;
    if (test) for (const node of ordered) if (test(node.path)) hits++;
    return hits === n ? glob : null;
  };
  const whole = new Map(); // group -> its key when all its allowed members are chosen, else null
  for (const group of groups.values()) {
    const inScope = group.members.filter(allowed);
    const scope = inScope.length ? inScope : group.members;
    whole.set(group, scope.every((m) => chosen.has(m.path)) ? groupKey(group) : null);
  }
  const items = [];
  const seen = new Set();
  for (const node of ordered) {
    if (!chosen.has(node.path)) continue;
    const group = groupOf.get(node.path);
    const key = (group && whole.get(group)) || exactKey(node.path);
    if (!seen.has(key)) {
      seen.add(key);
      items.push(key);
    }
  }
  return items.join(", ");
}

/**
 * The new spec text after a click on `node`'s checkbox (a display node, or anything with targetPaths/paths).
 * The current selection is `selected` (Python's answer); with options.preferText (the text was edited and
 * Python has not answered yet) it is what `text` matches, when JS can resolve it (no presets, no invalid regex).
 * The click selects all of the node's adaptable paths (those the layers filter lets through) unless all are
 * selected, then deselects them all. The result is explicit keys (see specForPaths): presets and globs
 * become a list on purpose. options.layers: indices from the layers field (null = all).
 */
export function toggleTarget(text, selected, node, nodesByPath, options = {}) {
  const byPath = nodesByPath instanceof Map ? nodesByPath : new Map(Object.entries(nodesByPath || {}));
  const isAdaptable = (p) => {
    const raw = byPath.get(p);
    return Boolean(raw && raw.kind && p);
  };
  const layerSet = options.layers ? new Set(options.layers) : null;
  const allowed = (p) => !layerSet || layerSet.has(byPath.get(p).layer);
  let current = null;
  if (options.preferText && String(text ?? "").trim()) {
    const spec = matchSpec(text, byPath.values(), options.layers || null);
    if (!spec.presets.length && !spec.invalid.length) current = spec.paths;
  }
  if (current === null) current = new Set([...(selected || [])].filter(isAdaptable));
  const clicked = (node.targetPaths || node.paths || (node.path ? [node.path] : [])).filter(isAdaptable);
  const inScope = clicked.filter(allowed);
  const scope = inScope.length ? inScope : clicked;
  if (scope.length && scope.every((p) => current.has(p))) for (const p of clicked) current.delete(p);
  else for (const p of scope) current.add(p);
  return specForPaths(current, byPath, options);
}
