"""Task accuracy beside KL: synthetic facts planted into chunks of a real text, asked about in several phrasings.

Each case's answer sits in exactly one of its chunks (a fact such as "The access code for project Orion is
4817." spliced in after a line break); the other chunks are the real text alone. The generated answer (greedy,
cut at the first line break or end-of-turn) is scored against the planted value by exact match (the
normalised value occurs in the normalised answer) and SQuAD-style token F1 (which also charges verbosity).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from kvblend.model.tokenizer import encode

NAMES = ("Orion", "Falcon", "Juniper", "Cobalt", "Maple", "Quartz", "Harbor", "Ember", "Lyric", "Nimbus", "Saffron",
         "Tundra", "Willow", "Zephyr", "Basalt", "Cinder")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Zagreb", "Accra", "Perth")
PEOPLE = ("Maria Lopez", "Kenji Sato", "Amara Okafor", "Lukas Weber", "Priya Nair", "Tomas Novak", "Elena Petrova")
COLORS = ("green", "purple", "orange", "yellow", "silver", "crimson", "turquoise")


@dataclass(frozen=True)
class FactTemplate:
    """A fact sentence with slots {name} and {value}, the values it draws from, and its question phrasings."""

    kind: str
    fact: str
    values: tuple[str, ...]
    questions: tuple[str, ...]


TEMPLATES = (
    FactTemplate("code", "The access code for project {name} is {value}.",
                 tuple(str(n) for n in range(1000, 10000, 137)),
                 ("What is the access code for project {name}?", "Which access code does project {name} use?",
                  "Tell me the access code of project {name}.")),
    FactTemplate("city", "The {name} team is based in the city of {value}.", CITIES,
                 ("In which city is the {name} team based?", "Where is the {name} team based?",
                  "Which city is the home of the {name} team?")),
    FactTemplate("person", "The lead engineer of project {name} is {value}.", PEOPLE,
                 ("Who is the lead engineer of project {name}?", "Who leads the engineering of project {name}?",
                  "Name the lead engineer of project {name}.")),
    FactTemplate("color", "The official color of project {name} is {value}.", COLORS,
                 ("What is the official color of project {name}?", "Which color is project {name}'s official color?",
                  "What color did project {name} choose as its official color?")),
    FactTemplate("year", "Project {name} was founded in the year {value}.", tuple(str(y) for y in range(1961, 2020, 3)),
                 ("In what year was project {name} founded?", "When was project {name} founded?",
                  "Which year saw the founding of project {name}?")),
)


@dataclass(frozen=True)
class PlantedFact:
    kind: str
    phrasing: int
    question: str
    answer: str
    chunk: int  # which chunk of the case holds it


def plant(tokenizer, ids: Sequence[int], sentence: str, rng: random.Random) -> tuple[int, ...]:
    """`ids` with the sentence's tokens spliced in after a line break in its middle half (a random position if
    there is none), cut back to the same length (the tail is dropped, never the fact)."""
    fact = encode(tokenizer, sentence + "\n")
    n = len(ids)
    if len(fact) >= n // 2:
        raise ValueError(f"a planted fact of {len(fact)} tokens does not fit a chunk of {n}")
    breaks = [i + 1 for i in range(n // 4, 3 * n // 4) if "\n" in tokenizer.decode([ids[i]])]
    at = rng.choice(breaks) if breaks else rng.randrange(n // 4, 3 * n // 4)
    return tuple((list(ids[:at]) + fact + list(ids[at:]))[:n])


def fact_for(index: int, templates: Sequence[FactTemplate], rng: random.Random) -> tuple[FactTemplate, int, str, str]:
    """Case `index`'s template (cycling through them, phrasing after phrasing), project name and value."""
    template = templates[index % len(templates)]
    phrasing = (index // len(templates)) % len(template.questions)
    return template, phrasing, rng.choice(NAMES), rng.choice(template.values)


def planted_cases(tokenizer, base_cases, templates: Sequence[FactTemplate] = TEMPLATES, seed: int = 0):
    """Turn fidelity cases (kvblend.eval.fidelity.CaseSpec) into task cases: each gets one fact planted into one
    of its chunks (at random) and the matching question; returns (cases with answers, facts)."""
    rng = random.Random(seed)
    cases, facts = [], []
    for i, case in enumerate(base_cases):
        template, phrasing, name, value = fact_for(i, templates, rng)
        where = rng.randrange(len(case.chunks))
        chunks = list(case.chunks)
        chunks[where] = plant(tokenizer, chunks[where], template.fact.format(name=name, value=value), rng)
        question = template.questions[phrasing].format(name=name)
        cases.append(replace(case, chunks=tuple(chunks), question=question, answer=value,
                             task=f"{template.kind}/{phrasing}"))
        facts.append(PlantedFact(template.kind, phrasing, question, value, where))
    return cases, facts


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The generated answer: decoded, cut at the first line break or end-of-turn token."""
    eos = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int)}
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(t)
    return tokenizer.decode(out).strip().split("\n")[0]


def normalize(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation or articles, words."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match(answer: str, gold: str) -> bool:
    """The normalised gold value occurs as a word sequence in the normalised answer."""
    a, g = normalize(answer), normalize(gold)
    return any(a[i : i + len(g)] == g for i in range(len(a) - len(g) + 1)) if g else False


def token_f1(answer: str, gold: str) -> float:
    """SQuAD token F1 between the answer and the gold value."""
    a, g = normalize(answer), normalize(gold)
    common = sum((Counter(a) & Counter(g)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(g)
    return 2 * precision * recall / (precision + recall)


# The kinds used by default: those full prefill answers. SmolLM2-135M answers in a full sentence, so the code values
# end at its 13th token: score with >= 16 greedy steps. Colour and year are left out: with full prefill and 20 steps
# SmolLM2 answered neither (benchmarks/HISTORY.md, "Per-request quality gate and task accuracy").
ANSWERABLE = ("code", "city", "person")


def task_templates(kinds: str | None = None) -> tuple[FactTemplate, ...]:
    """The templates of the comma-separated `kinds` (default: ANSWERABLE); an unknown kind is an error."""
    chosen = ANSWERABLE if not kinds else tuple(k.strip() for k in kinds.split(",") if k.strip())
    known = {t.kind: t for t in TEMPLATES}
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        raise ValueError(f"unknown fact templates {unknown}; known: {sorted(known)}")
    return tuple(known[k] for k in chosen)
