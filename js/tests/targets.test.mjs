// The shared target-spec table (tests/fixtures/target_cases.json, also read by tests/core/test_targets.py): on the
// tree rows the panel sends for each tiny model (tests/fixtures/target_rows.json), the tree highlights what
// Python's resolver selects. See the table's "about" for how a case reads.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { foldTree, matchSpec, parseLayers } from "../tree_logic.js";
import { layerOf } from "./fixtures.mjs";

const fixtures = new URL("../../tests/fixtures/", import.meta.url);
const read = (name) => JSON.parse(readFileSync(new URL(name, fixtures), "utf8"));
const table = read("target_cases.json");
const shapes = read("target_rows.json");

const asText = (value) => (Array.isArray(value) ? value.join(", ") : (value ?? ""));
const sorted = (paths) => [...paths].sort();

/** What the tree does with a case: parse the layers field (an invalid one filters nothing), then match. */
function treeView(c) {
  const { rows, num_layers: numLayers } = shapes[c.shape];
  let layers = null;
  let layersError = null;
  try {
    layers = parseLayers(asText(c.layers), numLayers);
  } catch (err) {
    layersError = err;
  }
  return { result: matchSpec(asText(c.targets), rows, layers), layersError };
}

test("the table has cases for every shape, and rows for every shape", () => {
  assert.deepEqual(Object.keys(shapes).sort(), Object.keys(table.shapes).sort());
  for (const shape of Object.keys(table.shapes)) assert.ok(table.cases.some((c) => c.shape === shape), shape);
});

for (const c of table.cases) {
  test(`target case ${c.id}`, () => {
    const { result, layersError } = treeView(c);
    const highlight = c.highlight ?? (c.error ? [] : c.expected);
    assert.deepEqual(sorted(result.paths), sorted(highlight), "highlighted paths");
    assert.deepEqual(result.presets, c.presets ?? [], "presets left to Python");
    assert.deepEqual(result.unmatched, c.unmatched ?? [], "items that match nothing");
    assert.deepEqual(result.invalid, c.invalid ?? [], "items that do not compile");
    if (layersError) {
      assert.ok(c.error, `the layers field was refused: ${layersError.message}`);
      assert.match(layersError.message, new RegExp(c.error));
    }
    if (!c.exclude && result.presets.length === 0) {
      const flagged =
        result.invalid.length > 0 || result.unmatched.length > 0 || layersError !== null || result.paths.size === 0;
      assert.equal(flagged, Boolean(c.error), c.error ? `Python refuses it: ${c.error}` : "Python accepts it");
    }
  });
}

test("the layers field: parseLayers reads it as parse_layers does", () => {
  for (const c of table.layers) {
    if (c.error) assert.throws(() => parseLayers(c.layers, c.num_layers), new RegExp(c.error), c.id);
    else assert.deepEqual(parseLayers(c.layers, c.num_layers), c.expected, c.id);
  }
});

test("the synthetic fixtures' layers follow the rule of the rows Python builds", () => {
  for (const [shape, { rows, block_lists: blockLists }] of Object.entries(shapes)) {
    for (const row of rows) assert.equal(layerOf(row.path, blockLists), row.layer, `${shape}: ${row.path}`);
  }
});

test("the folded tree of every shape offers each adaptable module exactly once", () => {
  for (const [shape, { rows, block_lists: blockLists }] of Object.entries(shapes)) {
    const root = foldTree(rows, blockLists);
    const adaptable = rows.filter((r) => r.kind && r.path).map((r) => r.path);
    assert.deepEqual(sorted(root.targetPaths), sorted(adaptable), shape);
    assert.equal(new Set(root.targetPaths).size, adaptable.length, shape);
    assert.equal(root.params, rows[0].params, shape);
  }
});
