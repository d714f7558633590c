import assert from "node:assert/strict";
import { test } from "node:test";

import { formatBytes, formatCount, parseLayers } from "../tree_logic.js";

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

test("parseLayers: indices and ranges, sorted and unique", () => {
  const cases = [
    ["", 32, null],
    ["   ", 32, null],
    [null, 32, null],
    ["5", 32, [5]],
    ["0-3", 32, [0, 1, 2, 3]],
    ["0-3, 2, 20", 32, [0, 1, 2, 3, 20]],
    ["10:12", 32, [10, 11, 12]],
    ["10..12", 32, [10, 11, 12]],
    [" 1 - 2 ,", 32, [1, 2]],
    ["-1", 32, [31]],
    ["-2, 0", 32, [0, 30]],
    ["31", 32, [31]],
  ];
  for (const [text, n, want] of cases) assert.deepEqual(parseLayers(text, n), want, `parseLayers(${text})`);
});

test("parseLayers: readable errors", () => {
  const cases = [
    ["32", 32, /"32" is out of range: this model has 32 layers, numbered 0-31/],
    ["0-40", 32, /out of range/],
    ["5-2", 32, /runs backwards; write it low-high, e.g. 2-5/],
    ["abc", 32, /"abc" is not an index or a range; write e.g. 0-11, 20 \(the model has layers 0-31\)/],
    ["1 2", 32, /not an index or a range/],
    ["-33", 32, /out of range/],
    ["0", 0, /no repeated layer blocks/],
  ];
  for (const [text, n, pattern] of cases) {
    assert.throws(() => parseLayers(text, n), pattern, `parseLayers(${text}, ${n})`);
  }
});
