import assert from "node:assert/strict";
import { test } from "node:test";

import { globSource, matchSpec, presetName, pythonRegExp, splitSpec } from "../tree_logic.js";
import { adaptablePaths, gpt2, llama, t5 } from "./fixtures.mjs";

test("splitSpec: commas outside brackets, trimmed, empties dropped", () => {
  const cases = [
    ["", []],
    ["q_proj", ["q_proj"]],
    [" q_proj , v_proj ,", ["q_proj", "v_proj"]],
    ["re:x{1,2}, lm_head", ["re:x{1,2}", "lm_head"]],
    ["layers.[0,1].mlp.*, o_proj", ["layers.[0,1].mlp.*", "o_proj"]],
    ["re:(a|b),c", ["re:(a|b)", "c"]],
    ["a)),b", ["a))", "b"]],
  ];
  for (const [text, want] of cases) assert.deepEqual(splitSpec(text), want, text);
});

test("presetName: Python's spelling rules", () => {
  const cases = [
    ["qv", "qv"],
    ["Attention", "attention"],
    ["all_linear", "all-linear"],
    ["ALL", "all-linear"],
    ["mlp", "mlp"],
    ["q_proj", null],
    ["attn", null],
  ];
  for (const [item, want] of cases) assert.equal(presetName(item), want, item);
});

test("globSource: fnmatch.translate semantics", () => {
  const cases = [
    // [glob, path, matches (full match, no suffix rule)]
    ["*.q_proj", "model.layers.0.self_attn.q_proj", true],
    ["*.q_proj", "q_proj", false],
    ["layers.1?.mlp.*", "layers.12.mlp.up_proj", true],
    ["layers.1?.mlp.*", "layers.1.mlp.up_proj", false],
    ["layers.[0-2].x", "layers.2.x", true],
    ["layers.[0-2].x", "layers.3.x", false],
    ["layers.[!0-2].x", "layers.3.x", true],
    ["layers.[!0-2].x", "layers.1.x", false],
    ["a[]]b", "a]b", true],
    ["a[^]b", "a^b", true],
    ["a[b", "a[b", true],
    ["a.b", "aXb", false],
    ["a+b(c)", "a+b(c)", true],
  ];
  for (const [glob, path, want] of cases) {
    assert.equal(new RegExp(`^(?:${globSource(glob)})$`).test(path), want, `${glob} vs ${path}`);
  }
});

test("pythonRegExp: whole-path match, Python named groups and leading flags", () => {
  const cases = [
    [".*\\.(q|v)_proj", "a.q_proj", true],
    ["(q|v)_proj", "a.q_proj", false],
    ["(?P<n>a)\\.(?P=n)", "a.a", true],
    ["(?i)LM_HEAD", "lm_head", true],
    ["x{1,2}", "xx", true],
  ];
  for (const [src, path, want] of cases) assert.equal(pythonRegExp(src).test(path), want, `${src} vs ${path}`);
  for (const bad of ["(", "[a-", "*x", "(?x) a"]) assert.equal(pythonRegExp(bad), null, bad);
});

const L = adaptablePaths(llama(3).nodes);
const G = adaptablePaths(gpt2(2).nodes);
const T = adaptablePaths(t5(1).nodes);
const attn = (i, names) => names.map((n) => `model.layers.${i}.self_attn.${n}`);

test("matchSpec: names, suffixes, globs, regexes as resolve_targets matches them", () => {
  const cases = [
    // [paths, text, expected paths (any order), presets, invalid, unmatched]
    [L, "q_proj", [0, 1, 2].flatMap((i) => attn(i, ["q_proj"]))],
    [L, "q_proj, v_proj", [0, 1, 2].flatMap((i) => attn(i, ["q_proj", "v_proj"]))],
    [L, "self_attn.o_proj", [0, 1, 2].flatMap((i) => attn(i, ["o_proj"]))],
    [L, "proj", [], [], [], ["proj"]],
    [L, "lm_head", ["lm_head"]],
    [L, "model.embed_tokens", ["model.embed_tokens"]],
    [L, "self_attn", [], [], [], ["self_attn"]], // a container: not adaptable
    [L, "layers.1.*", attn(1, ["q_proj", "k_proj", "v_proj", "o_proj"]).concat(
      ["gate_proj", "up_proj", "down_proj"].map((n) => `model.layers.1.mlp.${n}`))],
    [L, "*_proj", L.filter((p) => p.endsWith("_proj"))],
    [L, "layers.[01].self_attn.q_proj", attn(0, ["q_proj"]).concat(attn(1, ["q_proj"]))],
    [L, "re:.*\\.(q|v)_proj", [0, 1, 2].flatMap((i) => attn(i, ["q_proj", "v_proj"]))],
    [L, "re:(q|v)_proj", [], [], [], ["re:(q|v)_proj"]], // must match the whole path
    [L, "re:model\\.layers\\.(0|2)\\.self_attn\\.k_proj", attn(0, ["k_proj"]).concat(attn(2, ["k_proj"]))],
    [L, "re:(", [], [], ["re:("]],
    [L, "qv, Attention, all", [], ["qv", "attention", "all-linear"]],
    [L, "mlp, lm_head", ["lm_head"], ["mlp"]],
    [L, "", []],
    [G, "c_proj", ["attn", "mlp"].flatMap((s) => [0, 1].map((i) => `transformer.h.${i}.${s}.c_proj`))],
    [G, "attn.c_proj", [0, 1].map((i) => `transformer.h.${i}.attn.c_proj`)],
    [G, "h.0.*", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"].map((s) => `transformer.h.0.${s}`)],
    [T, "q", ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
      "decoder.block.0.layer.1.EncDecAttention.q"]],
    [T, "EncDecAttention.q", ["decoder.block.0.layer.1.EncDecAttention.q"]],
  ];
  for (const [paths, text, want, presets = [], invalid = [], unmatched = []] of cases) {
    const got = matchSpec(text, paths);
    assert.deepEqual([...got.paths].sort(), [...want].sort(), `paths of ${text}`);
    assert.deepEqual(got.presets, presets, `presets of ${text}`);
    assert.deepEqual(got.invalid, invalid, `invalid of ${text}`);
    assert.deepEqual(got.unmatched, unmatched, `unmatched of ${text}`);
  }
});

test("matchSpec: raw nodes are accepted and only adaptable ones count", () => {
  const { nodes } = llama(2);
  const got = matchSpec("*", nodes);
  assert.equal(got.paths.size, L.length - 7); // 2 of 3 layers
  for (const p of got.paths) assert.ok(nodes.find((n) => n.path === p).kind);
});
