import assert from "node:assert/strict";
import { test } from "node:test";

import { globSource, matchSpec, presetName, pythonRegExp, splitSpec } from "../tree_logic.js";
import { adaptablePaths, llama } from "./fixtures.mjs";

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
    // ranges that run backwards are dropped, as fnmatch drops them
    ["layers.[3-01].x", "layers.1.x", true],
    ["layers.[3-01].x", "layers.3.x", false],
    ["layers.[3-01].x", "layers.0.x", false],
    ["a[z-a]b", "a-b", false],
    ["a[!z-a]b", "aqb", true],
    ["a[a-]b", "a-b", true],
    ["a[0-1-3]b", "a-b", true],
    ["a[0-1-3]b", "a3b", true],
    ["a[0-1-3]b", "a2b", false],
    ["a[!]b", "a[!]b", true],
    ["a[!]]b", "axb", true],
    ["a[!]]b", "a]b", false],
  ];
  for (const [glob, path, want] of cases) {
    assert.equal(new RegExp(`^(?:${globSource(glob)})$`).test(path), want, `${glob} vs ${path}`);
  }
});

test("pythonRegExp: whole-path match, Python named groups, flags, anchors, comments and sets", () => {
  const cases = [
    [".*\\.(q|v)_proj", "a.q_proj", true],
    ["(q|v)_proj", "a.q_proj", false],
    ["(?P<n>a)\\.(?P=n)", "a.a", true],
    ["(?i)LM_HEAD", "lm_head", true],
    ["x{1,2}", "xx", true],
    ["x{,2}", "", true],
    ["x{,2}", "xxx", false],
    ["x{,}", "xxxx", true],
    ["\\Aa\\.b\\Z", "a.b", true],
    ["a\\\\Z", "a\\Z", true],
    ["a(?#note)b", "ab", true],
    ["[]a]+", "]a]", true],
    ["[^]a]", "b", true],
    ["[^]a]", "]", false],
    ["(?x) a \\  b  # comment", "a b", true],
    ["(?x)[ ]", " ", true],
    ["(?s)a.b", "a\nb", true],
  ];
  for (const [src, path, want] of cases) assert.equal(pythonRegExp(src).test(path), want, `${src} vs ${path}`);
  // Refused by Python (re.error), or not expressible in JS.
  const bad = ["(", "[a-", "*x", "\\e", "\\p{L}", "[\\Z]", "(?<n>a)", "(?L)a", "(?au)a", "a(?#open", "\\", "(?>a)", "a*+"];
  for (const src of bad) assert.equal(pythonRegExp(src), null, src);
});

test("matchSpec: raw nodes are accepted and only adaptable ones count", () => {
  const { nodes } = llama(2);
  const got = matchSpec("*", nodes);
  assert.equal(got.paths.size, adaptablePaths(nodes).length);
  assert.equal(got.paths.size, 2 * 7 + 2); // two blocks, the embedding and the LM head
  for (const p of got.paths) assert.ok(nodes.find((n) => n.path === p).kind);
});
