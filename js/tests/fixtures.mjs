// Synthetic `nodes` traits, shaped like jupyter_lora.widgets.tree.tree_rows: pre-order, params summed upwards,
// the root named after its class, layer = the index of the repeated block a path is in, read with tree_logic.js's
// blockOf (targets.test.mjs checks that reading against the rows Python builds for real models).

import { blockOf } from "../tree_logic.js";

/** m("q_proj", "Linear", {params, kind, shape}, [children]) */
export function m(name, type, opts = {}, children = []) {
  return { name, type, ...opts, children };
}

export const linear = (name, i, o, type = "Linear") =>
  m(name, type, { params: i * o, kind: "linear", shape: `${i}→${o}` });

/** The layer of a path: the index of the block it lies in, or null outside the block lists. */
export function layerOf(path, blockLists) {
  const { index } = blockOf(path, blockLists);
  return index !== null && /^\d+$/.test(index) ? Number(index) : null;
}

/** Flatten a module description into the trait's rows. */
export function flatten(root, blockLists = []) {
  const rows = [];
  const visit = (mod, path, parent, depth) => {
    const row = {
      id: rows.length,
      path,
      name: path ? mod.name : mod.type,
      type: mod.type,
      params: 0,
      kind: mod.kind || "",
      parent,
      depth,
      shape: mod.shape || "",
      layer: path ? layerOf(path, blockLists) : null,
    };
    rows.push(row);
    let total = mod.params || 0;
    for (const child of mod.children) {
      total += visit(child, path ? `${path}.${child.name}` : child.name, row.id, depth + 1);
    }
    row.params = total;
    return total;
  };
  visit(root, "", -1, 0);
  return rows;
}

const range = (n) => Array.from({ length: n }, (_, i) => i);

/** A Llama-like causal LM: 13 modules per block (7 linear). */
export function llama(numLayers = 4, d = 64, ff = 172, vocab = 1000) {
  const block = (i) =>
    m(String(i), "LlamaDecoderLayer", {}, [
      m("self_attn", "LlamaAttention", {}, [
        linear("q_proj", d, d),
        linear("k_proj", d, d / 4),
        linear("v_proj", d, d / 4),
        linear("o_proj", d, d),
      ]),
      m("mlp", "LlamaMLP", {}, [
        linear("gate_proj", d, ff),
        linear("up_proj", d, ff),
        linear("down_proj", ff, d),
        m("act_fn", "SiLU"),
      ]),
      m("input_layernorm", "LlamaRMSNorm", { params: d }),
      m("post_attention_layernorm", "LlamaRMSNorm", { params: d }),
    ]);
  const root = m("", "LlamaForCausalLM", {}, [
    m("model", "LlamaModel", {}, [
      m("embed_tokens", "Embedding", { params: vocab * d, kind: "embedding", shape: `${vocab}→${d}` }),
      m("layers", "ModuleList", {}, range(numLayers).map(block)),
      m("norm", "LlamaRMSNorm", { params: d }),
      m("rotary_emb", "LlamaRotaryEmbedding"),
    ]),
    linear("lm_head", d, vocab),
  ]);
  const blockLists = ["model.layers"];
  return { nodes: flatten(root, blockLists), blockLists };
}

/** A GPT-2-like model: Conv1D layers, "c_proj" both in attn and mlp. */
export function gpt2(numLayers = 3, d = 32) {
  const conv = (name, i, o) => m(name, "Conv1D", { params: i * o + o, kind: "conv1d-gpt2", shape: `${i}→${o}` });
  const block = (i) =>
    m(String(i), "GPT2Block", {}, [
      m("ln_1", "LayerNorm", { params: 2 * d }),
      m("attn", "GPT2Attention", {}, [conv("c_attn", d, 3 * d), conv("c_proj", d, d)]),
      m("ln_2", "LayerNorm", { params: 2 * d }),
      m("mlp", "GPT2MLP", {}, [conv("c_fc", d, 4 * d), conv("c_proj", 4 * d, d), m("act", "NewGELUActivation")]),
    ]);
  const root = m("", "GPT2LMHeadModel", {}, [
    m("transformer", "GPT2Model", {}, [
      m("wte", "Embedding", { params: 100 * d, kind: "embedding", shape: `100→${d}` }),
      m("wpe", "Embedding", { params: 16 * d, kind: "embedding", shape: `16→${d}` }),
      m("h", "ModuleList", {}, range(numLayers).map(block)),
      m("ln_f", "LayerNorm", { params: 2 * d }),
    ]),
    linear("lm_head", d, 100),
  ]);
  const blockLists = ["transformer.h"];
  return { nodes: flatten(root, blockLists), blockLists };
}

/** A T5-like encoder-decoder: two block lists, "q" in self- and cross-attention. */
export function t5(numLayers = 2, d = 16) {
  const attn = (name) => m(name, "T5Attention", {}, ["q", "k", "v", "o"].map((n) => linear(n, d, d)));
  const ff = () => m("DenseReluDense", "T5DenseActDense", {}, [linear("wi", d, 4 * d), linear("wo", 4 * d, d)]);
  const sub = (i, inner, type) =>
    m(String(i), type, {}, [inner, m("layer_norm", "T5LayerNorm", { params: d })]);
  const encBlock = (i) =>
    m(String(i), "T5Block", {}, [
      m("layer", "ModuleList", {}, [sub(0, attn("SelfAttention"), "T5LayerSelfAttention"), sub(1, ff(), "T5LayerFF")]),
    ]);
  const decBlock = (i) =>
    m(String(i), "T5Block", {}, [
      m("layer", "ModuleList", {}, [
        sub(0, attn("SelfAttention"), "T5LayerSelfAttention"),
        sub(1, attn("EncDecAttention"), "T5LayerCrossAttention"),
        sub(2, ff(), "T5LayerFF"),
      ]),
    ]);
  const root = m("", "T5ForConditionalGeneration", {}, [
    m("shared", "Embedding", { params: 100 * d, kind: "embedding", shape: `100→${d}` }),
    m("encoder", "T5Stack", {}, [m("block", "ModuleList", {}, range(numLayers).map(encBlock))]),
    m("decoder", "T5Stack", {}, [m("block", "ModuleList", {}, range(numLayers).map(decBlock))]),
    linear("lm_head", d, 100),
  ]);
  const blockLists = ["encoder.block", "decoder.block"];
  return { nodes: flatten(root, blockLists), blockLists };
}

/** A BERT-like classifier: the block list three levels down (bert.encoder.layer). */
export function bert(numLayers = 3, d = 16) {
  const block = (i) =>
    m(String(i), "BertLayer", {}, [
      m("attention", "BertAttention", {}, [
        m("self", "BertSelfAttention", {}, [linear("query", d, d), linear("key", d, d), linear("value", d, d)]),
        m("output", "BertSelfOutput", {}, [linear("dense", d, d)]),
      ]),
      m("intermediate", "BertIntermediate", {}, [linear("dense", d, 4 * d)]),
      m("output", "BertOutput", {}, [linear("dense", 4 * d, d)]),
    ]);
  const root = m("", "BertForSequenceClassification", {}, [
    m("bert", "BertModel", {}, [m("encoder", "BertEncoder", {}, [m("layer", "ModuleList", {}, range(numLayers).map(block))])]),
    linear("classifier", d, 2),
  ]);
  const blockLists = ["bert.encoder.layer"];
  return { nodes: flatten(root, blockLists), blockLists };
}

/** nn.Sequential(Linear, Linear, Linear): the root itself is the block list, its blocks are adaptable. */
export function sequential() {
  const root = m("", "Sequential", {}, [linear("0", 4, 4), linear("1", 4, 4), linear("2", 4, 4)]);
  return { nodes: flatten(root, [""]), blockLists: [""] };
}

/** Blocks that differ: every other block has an extra "gate" (like alternating MoE layers). */
export function ragged(numLayers = 4) {
  const block = (i) =>
    m(String(i), "Block", {}, [linear("proj", 8, 8), ...(i % 2 ? [linear("gate", 8, 2)] : [])]);
  const root = m("", "Net", {}, [m("blocks", "ModuleList", {}, range(numLayers).map(block)), linear("head", 8, 1)]);
  return { nodes: flatten(root, ["blocks"]), blockLists: ["blocks"] };
}

export const adaptablePaths = (nodes) => nodes.filter((n) => n.kind && n.path).map((n) => n.path);
