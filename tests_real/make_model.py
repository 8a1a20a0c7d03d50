"""Write a tiny random-weight GGUF model (qwen2 or llama architecture) that llama.cpp can load.

Nothing comes from a model hub: the tokenizer is copied from a vocab-only GGUF that
llama-cpp-python's sdist ships (vendor/llama.cpp/models/ggml-vocab-*.gguf) and the
weights are f32 noise from a seeded generator, so the file is the same on every run.

    python tests_real/make_model.py --vocab ggml-vocab-llama-spm.gguf --out tiny.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, PoolingType

N_EMBD = 256
N_LAYER = 4
N_HEAD = 4
N_FF = 512
N_CTX = 2048


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    """Copy every `tokenizer.*` key; return the vocabulary size."""
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab == 0:
        raise SystemExit("make_model: the vocab file has no tokenizer.ggml.tokens")
    return n_vocab


def write_model(vocab: Path, out: Path, arch: str = "qwen2", seed: int = 0) -> None:
    reader = GGUFReader(vocab)
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    writer = GGUFWriter(tmp, arch)
    writer.add_name("ntonix-tiny-random")
    writer.add_file_type(0)  # all f32: prefill runs about twice as fast as f16 on this CPU
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    # Mean pooling, as embedding models declare it: without it llama-cpp-python's /v1/embeddings
    # answers one vector per token (a list of lists), not the OpenAI shape. llama.cpp reads the
    # key for qwen2 (and BERT-like archs), not for llama.
    writer.add_pooling_type(PoolingType.MEAN)
    n_vocab = copy_tokenizer(reader, writer)
    writer.add_vocab_size(n_vocab)

    def noise(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    ones = np.ones(N_EMBD, dtype=np.float32)
    # numpy shapes are (out, in); gguf stores them reversed, as llama.cpp expects.
    writer.add_tensor("token_embd.weight", noise(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", noise(N_EMBD, N_EMBD))
        if arch == "qwen2":  # qwen2 has biases on q, k and v
            for name in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{i}.{name}.bias", noise(N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", noise(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", noise(N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", noise(N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", ones)
    # no output.weight: llama.cpp ties the output projection to token_embd

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=Path, required=True, help="vocab-only GGUF (tokenizer source)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--arch",
        choices=("qwen2", "llama"),
        default="qwen2",
        help="qwen2 (default) honours mean pooling for embeddings; llama does not",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.vocab.is_file():
        print(f"make_model: no vocab file at {args.vocab}", file=sys.stderr)
        return 2
    write_model(args.vocab, args.out, args.arch, args.seed)
    print(f"make_model: wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
