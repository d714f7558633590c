// The widget's ESM as jupyter_lora/widgets/tree.py builds it: module_tree.js with its marker line replaced by
// tree_logic.js minus the word "export " at line starts. It must be one valid module with a default render.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

const MARKER = "// @inline tree_logic.js";
const dir = new URL("..", import.meta.url);
const logic = readFileSync(new URL("tree_logic.js", dir), "utf8");
const entry = readFileSync(new URL("module_tree.js", dir), "utf8");

/** The same rule as tree.py: re.sub(r"^export ", "", logic, flags=re.M), then replace the marker once. */
function bundle() {
  return entry.replace(MARKER, () => logic.replace(/^export /gm, ""));
}

test("module_tree.js starts with the marker and ends with the default export", () => {
  assert.equal(entry.split("\n")[0], MARKER);
  assert.match(entry.trimEnd(), /\nexport default \{ render \};$/);
});

test("neither file imports anything, and tree_logic.js only exports declarations", () => {
  for (const [name, text] of [["tree_logic.js", logic], ["module_tree.js", entry]]) {
    assert.doesNotMatch(text, /^\s*import[\s{*"']/m, `${name} has an import`);
    assert.doesNotMatch(text, /\bimport\s*\(/, `${name} has a dynamic import`);
  }
  const exports = logic.split("\n").filter((line) => /^\s*export\b/.test(line));
  assert.ok(exports.length > 0);
  for (const line of exports) assert.match(line, /^export (function|const) \w+/, line);
});

test("the concatenation parses as one module whose default export has render()", async () => {
  const work = mkdtempSync(join(tmpdir(), "jl-bundle-"));
  try {
    const file = join(work, "module_tree.bundle.mjs");
    const text = bundle();
    assert.ok(!text.includes(MARKER));
    assert.doesNotMatch(text, /^export (?!default \{ render \};)/m);
    writeFileSync(file, text);
    const mod = await import(pathToFileURL(file).href);
    assert.deepEqual(Object.keys(mod), ["default"]);
    assert.equal(typeof mod.default.render, "function");
    assert.equal(mod.default.render.length, 1);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
