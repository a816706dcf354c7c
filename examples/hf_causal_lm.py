"""optimize() on a Hugging Face causal LM, then greedy generation, checked against eager.

The model is a small randomly initialised Llama with grouped-query attention (no download):
the point is the attention code path, `attn_implementation="eager"`, which is what the pass
rewrites. Prints explain() for the prefill and the tokens of both runs.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sdpa_pass


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="eager", pad_token_id=0)
    eager = LlamaForCausalLM(config).to(device).eval()
    model = copy.deepcopy(eager)
    prompt = torch.randint(1, 256, (2, 12), device=device)
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :4] = 0  # left padding in the second sequence

    with torch.no_grad():
        print(sdpa_pass.explain(model, prompt, attention_mask=attention_mask))
        sdpa_pass.optimize(model, backend="inductor" if device == "cuda" else "eager")
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
        want = eager.generate(prompt, **kwargs)
        got = model.generate(prompt, **kwargs)
    print("eager    :", want[:, prompt.shape[1]:].tolist())
    print("optimized:", got[:, prompt.shape[1]:].tolist())
    if not torch.equal(want, got):
        raise SystemExit("FAILED: generated tokens differ from eager")
    print("OK: optimized generation gives eager's tokens")


if __name__ == "__main__":
    main()
