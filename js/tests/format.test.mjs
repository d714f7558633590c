import assert from "node:assert/strict";
import { test } from "node:test";

import { footerText, formatBytes, formatCount } from "../tree_logic.js";

test("formatCount: three significant digits, K/M/B/T", () => {
  const cases = [
    [0, "0"],
    [7, "7"],
    [999, "999"],
    [1000, "1.00K"],
    [45_100, "45.1K"],
    [123_456, "123K"],
    [999_499, "999K"],
    [999_999, "1.00M"],
    [1_234_567, "1.23M"],
    [16_777_216, "16.8M"],
    [7e9, "7.00B"],
    [70_553_706_496, "70.6B"],
    [1.5e12, "1.50T"],
    [-2_500, "-2.50K"],
  ];
  for (const [n, want] of cases) assert.equal(formatCount(n), want, `formatCount(${n})`);
});

test("formatBytes: binary units like display.fmt_bytes", () => {
  const cases = [
    [0, "0 B"],
    [512, "512 B"],
    [1023, "1023 B"],
    [1024, "1 KiB"],
    [1536, "1.5 KiB"],
    [150 * 1024, "150 KiB"],
    [1.5 * 1024 ** 3, "1.5 GiB"],
    [12.345 * 1024 ** 2, "12.3 MiB"],
    [3 * 1024 ** 5, "3072 TiB"],
  ];
  for (const [n, want] of cases) assert.equal(formatBytes(n), want, `formatBytes(${n})`);
});

// parseLayers is checked against Python's parse_layers by the shared table (targets.test.mjs).

test("footerText: the selected modules' base parameters are labelled as frozen base weights", () => {
  assert.equal(footerText(4, 16, 3072), "4 of 16 adaptable modules selected, holding 3.07K frozen base parameters");
  assert.equal(footerText(1, 1, 64), "1 of 1 adaptable module selected, holding 64 frozen base parameters");
  assert.equal(footerText(0, 16, 0), "0 of 16 adaptable modules selected");
  assert.doesNotMatch(footerText(4, 16, 3072), /· [\d.]+K parameters/);
});
