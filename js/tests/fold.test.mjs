import assert from "node:assert/strict";
import { test } from "node:test";

import {
  defaultExpanded,
  foldTree,
  highlight,
  selectionState,
  visibleRows,
  walkTree,
} from "../tree_logic.js";
import { adaptablePaths, bert, gpt2, llama, ragged, sequential, t5 } from "./fixtures.mjs";

const find = (root, key) => {
  let hit = null;
  walkTree(root, (n) => {
    if (n.key === key) hit = n;
  });
  return hit;
};
const labels = (node) => node.children.map((c) => c.label);

test("foldTree: a Llama's layers fold into one group mirroring block 0", () => {
  const { nodes, blockLists } = llama(32);
  const root = foldTree(nodes, blockLists);
  assert.equal(root.label, "LlamaForCausalLM");
  assert.equal(root.params, nodes[0].params);
  assert.deepEqual(labels(root), ["model", "lm_head"]);
  const model = root.children[0];
  assert.deepEqual(labels(model), ["embed_tokens", "layers.0–31 ×32", "norm", "rotary_emb"]);
  const group = model.children[1];
  const list = nodes.find((n) => n.path === "model.layers");
  assert.deepEqual(
    { key: group.key, type: group.type, folded: group.folded, group: group.group, count: group.count, depth: group.depth },
    { key: "model.layers.*", type: "LlamaDecoderLayer", folded: true, group: true, count: 32, depth: 2 },
  );
  assert.equal(group.params, list.params);
  assert.equal(group.paths.length, 32);
  assert.equal(group.paths[31], "model.layers.31");
  assert.deepEqual(labels(group), ["self_attn", "mlp", "input_layernorm", "post_attention_layernorm"]);
  const q = find(root, "model.layers.*.self_attn.q_proj");
  const q0 = nodes.find((n) => n.path === "model.layers.0.self_attn.q_proj");
  assert.deepEqual(
    { label: q.label, type: q.type, kind: q.kind, shape: q.shape, params: q.params, folded: q.folded, depth: q.depth },
    { label: "q_proj", type: "Linear", kind: "linear", shape: "64→64", params: 32 * q0.params, folded: true, depth: 4 },
  );
  assert.deepEqual(q.paths, Array.from({ length: 32 }, (_, i) => `model.layers.${i}.self_attn.q_proj`));
  assert.deepEqual(q.targetPaths, q.paths);
  assert.equal(find(root, "model.layers.*.self_attn").targetPaths.length, 4 * 32);
  assert.equal(root.targetPaths.length, adaptablePaths(nodes).length);
  const head = find(root, "lm_head");
  assert.deepEqual(
    { paths: head.paths, path: head.path, folded: head.folded, kind: head.kind },
    { paths: ["lm_head"], path: "lm_head", folded: false, kind: "linear" },
  );
  assert.deepEqual(find(root, "model.norm").targetPaths, []);
});

test("foldTree: shapes of other architectures", () => {
  const cases = [
    // [name, fixture, [expected labels at a key]...]
    ["gpt2", gpt2(12), [["transformer", ["wte", "wpe", "h.0–11 ×12", "ln_f"]], ["transformer.h.*", ["ln_1", "attn", "ln_2", "mlp"]]]],
    ["t5", t5(6), [["encoder", ["block.0–5 ×6"]], ["decoder", ["block.0–5 ×6"]], ["decoder.block.*.layer", ["0", "1", "2"]],
      ["decoder.block.*.layer.1.EncDecAttention", ["q", "k", "v", "o"]]]],
    ["bert", bert(4), [["bert.encoder", ["layer.0–3 ×4"]]]],
    ["sequential", sequential(), [["", []]]],
    ["ragged", ragged(4), [["blocks.*", ["proj", "gate"]]]],
    ["no block lists", { nodes: llama(2).nodes, blockLists: [] }, [["model.layers", ["0", "1"]]]],
    ["unknown block list", { nodes: llama(2).nodes, blockLists: ["nope"] }, [["model.layers", ["0", "1"]]]],
  ];
  for (const [name, { nodes, blockLists }, checks] of cases) {
    const root = foldTree(nodes, blockLists);
    for (const [key, want] of checks) assert.deepEqual(labels(find(root, key) ?? { children: [] }), want, `${name}: ${key}`);
  }
});

test("foldTree: special cases", () => {
  assert.equal(foldTree([], []), null);
  const seq = foldTree(sequential().nodes, [""]);
  assert.deepEqual(
    { key: seq.key, label: seq.label, kind: seq.kind, paths: seq.paths, targets: seq.targetPaths },
    { key: "*", label: "0–2 ×3", kind: "linear", paths: ["0", "1", "2"], targets: ["0", "1", "2"] },
  );
  const rag = foldTree(ragged(4).nodes, ["blocks"]);
  const gate = find(rag, "blocks.*.gate");
  assert.deepEqual(gate.paths, ["blocks.1.gate", "blocks.3.gate"]); // only where it exists
  assert.equal(gate.params, 2 * 16);
});

test("foldTree: 70B-like tree (80 blocks) folds quickly", (t) => {
  const { nodes, blockLists } = llama(80, 8192, 28672, 128256);
  assert.ok(nodes.length > 1000, `${nodes.length} nodes`);
  foldTree(nodes, blockLists); // warm up the JIT
  const times = [];
  for (let i = 0; i < 15; i++) {
    const t0 = performance.now();
    foldTree(nodes, blockLists);
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  const median = times[7];
  const root = foldTree(nodes, blockLists);
  const rows = visibleRows(root, defaultExpanded(root));
  t.diagnostic(`fold ${nodes.length} nodes: median ${median.toFixed(2)} ms, first ${times[0].toFixed(2)} ms; ${rows.length} visible rows`);
  assert.ok(median < 20, `median fold time ${median.toFixed(1)} ms (bound 20 ms)`);
  assert.ok(rows.length <= 40, `${rows.length} visible rows`);
});

test("defaultExpanded / visibleRows: open above depth 2, the folded groups and their way up", () => {
  const cases = [
    [
      "llama",
      llama(32),
      ["LlamaForCausalLM", "model", "embed_tokens", "layers.0–31 ×32", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
        "mlp", "gate_proj", "up_proj", "down_proj", "act_fn", "input_layernorm", "post_attention_layernorm", "norm",
        "rotary_emb", "lm_head"],
    ],
    [
      "bert: the block list is deep",
      bert(12),
      ["BertForSequenceClassification", "bert", "encoder", "layer.0–11 ×12", "attention", "self", "query", "key", "value",
        "output", "dense", "intermediate", "dense", "output", "dense", "classifier"],
    ],
    ["no block lists: two levels", { nodes: llama(2).nodes, blockLists: [] }, ["LlamaForCausalLM", "model", "embed_tokens", "layers", "norm", "rotary_emb", "lm_head"]],
  ];
  for (const [name, { nodes, blockLists }, want] of cases) {
    const root = foldTree(nodes, blockLists);
    const open = defaultExpanded(root);
    assert.deepEqual(visibleRows(root, open).map((n) => n.label), want, name);
    assert.deepEqual(visibleRows(root, (key) => open.has(key)).map((n) => n.label), want, `${name} (predicate)`);
  }
  const root = foldTree(llama(2).nodes, ["model.layers"]);
  assert.deepEqual(visibleRows(root, new Set()).map((n) => n.label), ["LlamaForCausalLM"]);
});

test("highlight: rows that stand for a matched path, and the rows above them", () => {
  const { nodes, blockLists } = llama(4);
  const root = foldTree(nodes, blockLists);
  const cases = [
    [[], [], []],
    [["model.layers.2.self_attn.q_proj"], ["model.layers.*.self_attn.q_proj"], ["", "model", "model.layers.*", "model.layers.*.self_attn"]],
    [["lm_head"], ["lm_head"], [""]],
    [["model.embed_tokens", "model.layers.0.mlp.up_proj"], ["model.embed_tokens", "model.layers.*.mlp.up_proj"],
      ["", "model", "model.layers.*", "model.layers.*.mlp"]],
  ];
  for (const [matched, hits, inside] of cases) {
    const got = highlight(root, new Set(matched));
    assert.deepEqual([...got.hits].sort(), hits.sort(), `hits for ${matched}`);
    assert.deepEqual([...got.inside].sort(), inside.sort(), `inside for ${matched}`);
  }
});

test("selectionState: all / some / none / empty", () => {
  const { nodes, blockLists } = llama(4);
  const root = foldTree(nodes, blockLists);
  const q = (i) => `model.layers.${i}.self_attn.q_proj`;
  const cases = [
    ["model.layers.*.self_attn.q_proj", [q(0), q(1), q(2), q(3)], "all"],
    ["model.layers.*.self_attn.q_proj", [q(0), q(1)], "some"],
    ["model.layers.*.self_attn.q_proj", ["lm_head"], "none"],
    ["model.layers.*.self_attn", [q(0), q(1), q(2), q(3)], "some"],
    ["model.norm", [q(0)], "empty"],
    ["model.layers.*.mlp.act_fn", [], "empty"],
    ["lm_head", ["lm_head"], "all"],
  ];
  for (const [key, selected, want] of cases) assert.equal(selectionState(find(root, key), new Set(selected)), want, key);
});
