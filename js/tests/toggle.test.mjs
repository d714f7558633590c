import assert from "node:assert/strict";
import { test } from "node:test";

import { blockOf, foldTree, indexNodes, matchSpec, specForPaths, toggleTarget, walkTree } from "../tree_logic.js";
import { adaptablePaths, gpt2, llama, ragged, sequential, t5 } from "./fixtures.mjs";

const N = 4;
const models = {
  llama: llama(N),
  gpt2: gpt2(N),
  t5: t5(N),
  ragged: ragged(N),
  sequential: sequential(),
};
const setup = {};
for (const [name, { nodes, blockLists }] of Object.entries(models)) {
  const root = foldTree(nodes, blockLists);
  const byKey = new Map();
  walkTree(root, (n) => byKey.set(n.key, n));
  setup[name] = { nodes, blockLists, root, byKey, byPath: indexNodes(nodes, blockLists), all: adaptablePaths(nodes) };
}
const select = (name, text, layers = null) => [...matchSpec(text, setup[name].nodes, layers).paths];
const inLayers = (paths, layers) => paths.filter((p) => layers.includes(setup.llama.byPath.get(p).layer));
const llamaAll = setup.llama.all;
const linear = llamaAll.filter((p) => p.includes(".layers."));

test("blockOf: position relative to the block lists", () => {
  const cases = [
    ["model.layers.3.self_attn.q_proj", ["model.layers"], { block: "model.layers", index: "3", rel: "self_attn.q_proj" }],
    ["model.layers.3", ["model.layers"], { block: "model.layers", index: "3", rel: "" }],
    ["model.layers", ["model.layers"], { block: null, index: null, rel: null }],
    ["lm_head", ["model.layers"], { block: null, index: null, rel: null }],
    ["decoder.block.1.layer.0.SelfAttention.q", ["encoder.block", "decoder.block"], { block: "decoder.block", index: "1", rel: "layer.0.SelfAttention.q" }],
    ["2", [""], { block: "", index: "2", rel: "" }],
  ];
  for (const [path, lists, want] of cases) assert.deepEqual(blockOf(path, lists), want, path);
});

test("toggleTarget: clicks turn the selection into explicit keys in model order", () => {
  const cases = [
    // [model, clicked key, text, selected (spec, resolved like Python), options, expected text]
    ["llama", "model.layers.*.self_attn.k_proj", "qv", "q_proj, v_proj", {}, "q_proj, k_proj, v_proj"],
    ["llama", "model.layers.*.self_attn.q_proj", "q_proj, v_proj", "q_proj, v_proj", {}, "v_proj"],
    ["llama", "model.layers.*.self_attn.q_proj", "q_proj", "q_proj", {}, ""],
    ["llama", "model.layers.*.self_attn", "qv", "q_proj, v_proj", {}, "q_proj, k_proj, v_proj, o_proj"],
    ["llama", "model.layers.*.self_attn", "*.self_attn.*", "*.self_attn.*", {}, ""],
    ["llama", "lm_head", "all-linear", "re:.*layers.*", {}, "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"],
    ["llama", "model.layers.*.mlp", "attention", "self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj", {},
      "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
    ["llama", "", "q_proj", "q_proj", {}, "model.embed_tokens, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"],
    ["llama", "", "*", "*", {}, ""],
    ["llama", "model.embed_tokens", "", "q_proj, v_proj", {}, "model.embed_tokens, q_proj, v_proj"],
    // The layers field filters after the spec: a module selected in every allowed layer keeps its short key.
    ["llama", "model.layers.*.self_attn.k_proj", "q_proj", "q_proj", { layers: [0, 1] }, "q_proj, k_proj"],
    ["llama", "model.layers.*.self_attn.q_proj", "q_proj", "q_proj", { layers: [0, 1] }, ""],
    // A selection finer than the layers field (here: a regex picking layer 0) stays exact: full paths.
    ["llama", "lm_head", "re:model\\.layers\\.0\\..*q_proj", "re:model\\.layers\\.0\\..*q_proj", {},
      "model.layers.0.self_attn.q_proj, lm_head"],
    ["llama", "model.layers.*.self_attn.q_proj", "re:model\\.layers\\.0\\..*q_proj", "re:model\\.layers\\.0\\..*q_proj", {}, "q_proj"],
    // Names that would take more than the clicked module get a longer suffix or a glob.
    ["gpt2", "transformer.h.*.attn.c_proj", "c_attn", "c_attn", {}, "c_attn, attn.c_proj"],
    ["gpt2", "transformer.h.*.mlp", "", "c_attn", {}, "c_attn, c_fc, mlp.c_proj"],
    ["gpt2", "transformer.h.*.mlp.c_proj", "c_proj", "c_proj", {}, "attn.c_proj"],
    ["t5", "encoder.block.*.layer.0.SelfAttention.q", "", "", {}, "encoder.block.*.layer.0.SelfAttention.q"],
    ["t5", "decoder.block.*.layer.1.EncDecAttention.q", "", "", {}, "EncDecAttention.q"],
    ["t5", "decoder.block.*.layer.0.SelfAttention", "v", "v", {},
      "encoder.block.*.layer.0.SelfAttention.v, decoder.block.*.layer.0.SelfAttention.q, decoder.block.*.layer.0.SelfAttention.k, " +
        "decoder.block.*.layer.0.SelfAttention.v, decoder.block.*.layer.0.SelfAttention.o, EncDecAttention.v"],
    ["ragged", "blocks.*.gate", "proj", "proj", {}, "proj, gate"],
    ["ragged", "head", "", "", {}, "head"],
    ["sequential", "*", "", "", {}, "*"],
  ];
  for (const [name, key, text, selectedSpec, options, want] of cases) {
    const { byKey, byPath } = setup[name];
    const node = byKey.get(key);
    assert.ok(node, `${name}: no row ${key}`);
    const selected = select(name, selectedSpec, options.layers);
    const got = toggleTarget(text, selected, node, byPath, options);
    assert.equal(got, want, `${name}: click ${key} with ${selectedSpec}`);
    // The new text selects exactly what the click meant: the old selection with the row's modules toggled.
    const before = new Set(selected);
    const rows = node.targetPaths.filter((p) => !options.layers || options.layers.includes(byPath.get(p).layer));
    const scope = rows.length ? rows : node.targetPaths;
    const on = !scope.every((p) => before.has(p));
    for (const p of node.targetPaths) before.delete(p);
    if (on) for (const p of scope) before.add(p);
    assert.deepEqual(select(name, got, options.layers).sort(), [...before].sort(), `${name}: ${got} selects the toggled set`);
  }
});

test("toggleTarget: a plain path -> node map (no block positions) gives the same keys", () => {
  const { nodes, byKey } = setup.llama;
  const plain = new Map(nodes.map((n) => [n.path, n]));
  const plainObject = Object.fromEntries(nodes.map((n) => [n.path, n]));
  const node = byKey.get("model.layers.*.self_attn.k_proj");
  const selected = select("llama", "q_proj, lm_head");
  for (const map of [plain, plainObject]) {
    assert.equal(toggleTarget("", selected, node, map), "q_proj, k_proj, lm_head");
  }
  const block0 = { paths: ["model.layers.0.self_attn.q_proj"] }; // anything with paths works
  assert.equal(toggleTarget("", [], block0, plain), "model.layers.0.self_attn.q_proj");
});

test("toggleTarget: preferText uses the edited text when Python has not answered yet", () => {
  const { byKey, byPath } = setup.llama;
  const v = byKey.get("model.layers.*.self_attn.v_proj");
  const stale = select("llama", "q_proj, v_proj");
  const cases = [
    ["k_proj", stale, { preferText: true }, "k_proj, v_proj"],
    ["k_proj", stale, {}, "q_proj"], // Python's selection is authoritative without preferText
    ["k_proj, attention", stale, { preferText: true }, "q_proj"], // a preset: JS cannot resolve it, use selected
    ["re:(", stale, { preferText: true }, "q_proj"],
    ["", stale, { preferText: true }, "q_proj"], // empty = Python's default (qv)
  ];
  for (const [text, selected, options, want] of cases) {
    assert.equal(toggleTarget(text, selected, v, byPath, options), want, `${text} ${JSON.stringify(options)}`);
  }
});

test("specForPaths: exact keys for any set", () => {
  const { byPath } = setup.llama;
  const cases = [
    [[], ""],
    [linear, "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"],
    [inLayers(linear, [1]), linear.filter((p) => p.startsWith("model.layers.1.")).join(", ")],
    [["lm_head", "model.embed_tokens"], "model.embed_tokens, lm_head"],
  ];
  for (const [paths, want] of cases) assert.equal(specForPaths(new Set(paths), byPath), want);
  // A full path that is also the suffix of another path is written as an escaped regex.
  const nodes = [
    { id: 0, path: "", name: "Net", type: "Net", params: 2, kind: "", parent: -1, depth: 0, shape: "", layer: null },
    { id: 1, path: "head", name: "head", type: "Linear", params: 1, kind: "linear", parent: 0, depth: 1, shape: "1→1", layer: null },
    { id: 2, path: "aux", name: "aux", type: "Aux", params: 1, kind: "", parent: 0, depth: 1, shape: "", layer: null },
    { id: 3, path: "aux.head", name: "head", type: "Linear", params: 1, kind: "linear", parent: 2, depth: 2, shape: "1→1", layer: null },
  ];
  const spec = specForPaths(new Set(["head"]), indexNodes(nodes, []));
  assert.equal(spec, "re:head");
  assert.deepEqual([...matchSpec(spec, ["head", "aux.head"]).paths], ["head"]);
});
