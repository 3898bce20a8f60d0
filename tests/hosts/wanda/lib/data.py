# The shape of locuslab/wanda lib/data.py: C4 calibration, WikiText-2 evaluation, via the hub.
import random

from datasets import load_dataset


class TokenizerWrapper:
    def __init__(self, input_ids):
        self.input_ids = input_ids


def get_c4(nsamples, seed, seqlen, tokenizer):
    traindata = load_dataset('allenai/c4', 'allenai--c4', data_files={'train': 'en/c4-train.00000-of-01024.json.gz'}, split='train')
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            trainenc = tokenizer(traindata[i]['text'], return_tensors='pt')
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        inp = trainenc.input_ids[:, i:i + seqlen]
        tar = inp.clone()
        tar[:, :-1] = -100
        trainloader.append((inp, tar))
    return trainloader, None


def get_wikitext2_test(tokenizer):
    testdata = load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')
    return tokenizer("\n\n".join(testdata['text']), return_tensors='pt')
