# The shape of locuslab/wanda lib/eval.py: WikiText-2 perplexity in model.seqlen windows.
import torch
import torch.nn as nn

from .data import get_wikitext2_test


def eval_ppl(model, tokenizer, device=torch.device("cuda:0"), max_windows=None):
    testenc = get_wikitext2_test(tokenizer).input_ids
    nsamples = testenc.numel() // model.seqlen
    if max_windows:
        nsamples = min(nsamples, max_windows)
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            inputs = testenc[:, (i * model.seqlen):((i + 1) * model.seqlen)].to(device)
            lm_logits = model(inputs).logits
            shift_logits = lm_logits[:, :-1, :].contiguous()
            loss = nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)).float(),
                                         inputs[:, 1:].reshape(-1))
            nlls.append(loss.float() * model.seqlen)
    torch.cuda.empty_cache()
    return torch.exp(torch.stack(nlls).sum() / (nsamples * model.seqlen)).item()
