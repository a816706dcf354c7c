"""What the pass finds in an encoder-decoder model: a tiny random-weight Hugging Face BART.

Each layer has its own kinds of attention: encoder self-attention (padding mask), decoder
self-attention (causal + padding mask built in the graph) and cross attention (the encoder's
padding mask). `sdpa_pass.explain` prints one row per site with the mask it found; every site
must be rewritten, and the optimized model must give eager's output.

    python examples/explain_encoder_decoder.py [--device cpu|cuda] [--layers 2]
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import BartConfig, BartModel

import sdpa_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    parser.add_argument("--seq", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = BartConfig(vocab_size=128, d_model=64, encoder_layers=args.layers, decoder_layers=args.layers,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=64, attn_implementation="eager")
    eager = BartModel(config).to(device).eval()
    model = copy.deepcopy(eager)
    input_ids = torch.randint(3, 128, (2, args.seq), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # the second source sentence is 3 tokens shorter
    decoder_input_ids = torch.randint(3, 128, (2, args.seq // 2), device=device)
    inputs = dict(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)

    with torch.no_grad():
        report = sdpa_pass.explain(model, input_ids, **inputs)
        print(report)
        expected = eager(input_ids, **inputs).last_hidden_state
        sdpa_pass.optimize(model, backend="inductor" if device.type == "cuda" else "eager")
        got = model(input_ids, **inputs).last_hidden_state

    sites = 3 * args.layers  # encoder self; decoder self and cross, per layer
    if report.num_rewritten != sites or len(report.sites) != sites:
        raise SystemExit(f"FAILED: {report.num_rewritten} of {len(report.sites)} sites rewritten, "
                         f"expected {sites} of {sites}")
    err = (got - expected).abs().max().item()
    print(f"\nmax |optimized - eager| = {err:.2e} on {device}")
    if not err < 1e-4:
        raise SystemExit("FAILED: the optimized model differs from eager")
    print(f"OK: all {sites} attention sites (encoder, decoder, cross) rewritten, output equals eager")


if __name__ == "__main__":
    main()
