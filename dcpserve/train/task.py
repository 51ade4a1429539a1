"""The synthetic long-context task the demo model is trained on, and its word-level tokenizer.

A document is filler sentences with facts ("the code of kavo is 734 .") scattered through it, followed by
questions ("question : what is the code of kavo ? answer : 734 ."). Answering needs the one fact that names
the key, which can be anywhere in the context: the DSA indexer has to select it out of thousands of tokens.

The tokenizer is built here, not trained: every word the task uses is one token (names, numbers 0-999,
filler words, punctuation), so a fact is 7 tokens and the answer is a single token. Encoding adds BOS, as
training does.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

BOS, EOS, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>"
# Chat markers of the DeepSeek template, so /v1/chat/completions encodes without unknown specials.
SPECIALS = [BOS, EOS, UNK, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
PUNCT = [".", ",", "?", ":", "!", "-"]
TEMPLATE = ["the", "code", "of", "is", "question", "what", "answer"]
SUBJECTS = ["the cat", "a bird", "the old man", "my friend", "the river", "a small dog", "the farmer", "our teacher",
            "the wind", "a young girl", "the king", "the baker", "a fox", "the sailor", "my sister", "the sun"]
VERBS = ["sees", "likes", "walks to", "finds", "paints", "watches", "follows", "carries", "hears", "visits",
         "remembers", "builds", "cleans", "draws", "opens", "reads"]
OBJECTS = ["a red house", "the green hill", "an old boat", "the quiet lake", "a tall tree", "the dark forest",
           "a blue door", "the long road", "a warm fire", "the white stone", "a big garden", "the cold sea",
           "a new book", "the bright moon", "a wooden bridge", "the empty field"]
ENDINGS = ["today", "at night", "in the morning", "again", "with care", "every day", "for a while", "slowly"]
# Codes are the words "0" .. "99", one token each. With 1000 codes each token is too rare for a small model
# to learn to copy in minutes of training; 100 are learnt in a few hundred steps.
NUM_VALUES = 100
NUM_NAMES = 512


def _filler_words() -> list[str]:
    words: list[str] = []
    for phrase in SUBJECTS + VERBS + OBJECTS + ENDINGS:
        words += phrase.split()
    return list(dict.fromkeys(w for w in words if w not in TEMPLATE))


def _names() -> list[str]:
    """NUM_NAMES two-syllable names (kavo, miru, ...), fixed order."""
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    rng = random.Random(7)
    filler = set(_filler_words())
    pairs = [a + b for a, b in itertools.product(syll, syll) if a != b and a + b not in filler]
    rng.shuffle(pairs)
    return sorted(pairs[:NUM_NAMES])


NAMES = _names()


def vocabulary() -> list[str]:
    """Token strings in id order; padded to a multiple of 64 so every TP size divides it."""
    words = SPECIALS + PUNCT + TEMPLATE + _filler_words() + NAMES + [str(i) for i in range(NUM_VALUES)]
    assert len(set(words)) == len(words)
    pad = -len(words) % 64
    return words + [f"<reserved_{i}>" for i in range(pad)]


VOCAB = vocabulary()
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenizer_json() -> str:
    """A HF `tokenizers` word-level tokenizer over VOCAB: lower-cased, split on spaces and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=TOKEN_ID, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    tok.add_special_tokens(SPECIALS)
    # Training documents start with BOS; so must a served prompt (`add_special_tokens=True`).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, TOKEN_ID[BOS])])
    return tok.to_str()


@dataclass
class Sample:
    """One document: `ids` (BOS first), the text it encodes, and where each question's answer token is."""

    ids: list[int]
    text: str
    answer_at: list[int]  # index in ids of each answer token (predicted from the position before it)
    answers: list[str]
    num_facts: int


def fact(name: str, value: int) -> list[str]:
    return ["the", "code", "of", name, "is", str(value), "."]


def question(name: str) -> list[str]:
    return ["question", ":", "what", "is", "the", "code", "of", name, "?", "answer", ":"]


def filler_sentence(rng: random.Random) -> list[str]:
    words = [*rng.choice(SUBJECTS).split(), *rng.choice(VERBS).split(), *rng.choice(OBJECTS).split()]
    if rng.random() < 0.5:
        words += rng.choice(ENDINGS).split()
    return words + ["."]


def make_sample(rng: random.Random, context_len: int, num_facts: int, num_questions: int = 1,
                eos: bool = True) -> Sample:
    """A document of about `context_len` context tokens (facts + filler) and `num_questions` questions on
    distinct facts; with one question and eos=False the text ends at "answer :", ready for completion."""
    names = rng.sample(NAMES, num_facts)
    values = [rng.randrange(NUM_VALUES) for _ in names]
    sentences: list[list[str]] = []
    n = 0
    while n < context_len - 7 * num_facts:
        s = filler_sentence(rng)
        sentences.append(s)
        n += len(s)
    for i in range(num_facts):
        sentences.insert(rng.randrange(len(sentences) + 1), fact(names[i], values[i]))
    words = [w for s in sentences for w in s]
    answer_at, answers = [], []
    for i in rng.sample(range(num_facts), min(num_questions, num_facts)):
        words += question(names[i])
        answer_at.append(len(words) + 1)  # +1: BOS
        answers.append(str(values[i]))
        words += [str(values[i]), "."]
    if not eos:  # completion prompt: stop right before the answer
        words = words[: answer_at[-1] - 1] if num_questions == 1 else words
    ids = [TOKEN_ID[BOS]] + [TOKEN_ID[w] for w in words] + ([TOKEN_ID[EOS]] if eos else [])
    return Sample(ids, " ".join(words), answer_at, answers, num_facts)


def prompt(rng: random.Random, context_len: int, num_facts: int) -> tuple[str, str]:
    """(prompt text ending in "answer :", expected answer word) for evaluation against a server."""
    s = make_sample(rng, context_len, num_facts, num_questions=1, eos=False)
    return s.text, s.answers[0]


def main(argv: list[str] | None = None) -> None:
    """Print (or write) an OpenAI /v1/completions request body for one retrieval question."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m dcpserve.train.task", description=main.__doc__)
    p.add_argument("--context-len", type=int, default=2000, help="words of context")
    p.add_argument("--num-facts", type=int, default=1, help="facts in the document (one is asked about)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    text, answer = prompt(random.Random(args.seed), args.context_len, args.num_facts)
    body = json.dumps({"model": "dcpserve-default", "prompt": text, "max_tokens": 2, "temperature": 0,
                       "expected_answer": answer}, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(body + "\n")
    else:
        print(body)


if __name__ == "__main__":
    main()
