"""Write the project's sentence-classification dataset: short English reviews with a
three-way sentiment label (negative / neutral / positive), from templates and word lists in this
file, with a fixed seed.

    python data/generate.py            # rewrites data/reviews/{train,validation,test}.jsonl

Every sentence is built from an explicit structure (one opinion, a negated opinion, two opinions
joined by a contrast, a hedge, a plain fact), so its label follows from rules, not from a person:

- one opinion ("the battery life was superb") takes the opinion word's polarity;
- a negated opinion ("the plot was not exactly gripping") flips it; a negated negative word
  ("not bad at all") becomes positive;
- "X but Y", "although X, Y", "X; however, Y": the main clause Y decides;
- "X and Y" with two opinions of one polarity keeps it;
- facts with no opinion ("the parcel arrived on a Tuesday") are neutral, and so are balanced
  statements ("some parts were good and some were poor") and hedges ("I cannot say yet").

The split is fixed by the seed; the test set uses templates held out from training (about a
fifth of the syntactic frames), so it measures generalisation over syntax as well as vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240601
SIZES = {"train": 3000, "validation": 600, "test": 1000}
LABELS = ["negative", "neutral", "positive"]

TOPICS = {
    "restaurant": {
        "things": [
            "the food",
            "the pasta",
            "the service",
            "the waiter",
            "the dessert",
            "the soup",
            "the wine list",
            "the atmosphere",
            "the curry",
            "the portion size",
            "the staff",
        ],
        "pos": [
            "delicious",
            "superb",
            "fresh",
            "generous",
            "attentive",
            "wonderful",
            "flavourful",
            "charming",
        ],
        "neg": ["bland", "cold", "greasy", "overpriced", "rude", "stale", "soggy", "disappointing"],
        "facts": [
            "the restaurant opens at {hour}",
            "we booked a table for {n} on {day}",
            "the menu changes every {month}",
            "the kitchen closes at {hour} on {day}s",
            "we ordered {n} starters and a main",
            "the chairs are {colour}",
            "we went there in {month}",
            "the bill came to {n} items",
            "the terrace seats {n} people",
        ],
        "item": "restaurant",
    },
    "film": {
        "things": [
            "the plot",
            "the acting",
            "the soundtrack",
            "the ending",
            "the dialogue",
            "the lead actress",
            "the cinematography",
            "the pacing",
            "the villain",
            "the script",
        ],
        "pos": [
            "gripping",
            "brilliant",
            "moving",
            "clever",
            "beautiful",
            "memorable",
            "funny",
            "convincing",
        ],
        "neg": [
            "boring",
            "predictable",
            "clumsy",
            "dull",
            "wooden",
            "confusing",
            "forgettable",
            "tedious",
        ],
        "facts": [
            "the film runs for {n} minutes past two hours",
            "it was shot over {n} months",
            "the director also wrote the script",
            "the sequel comes out in {month}",
            "we watched it on {day}",
            "the poster is mostly {colour}",
            "it opened in {n} cinemas",
            "the screening started at {hour}",
            "the cast has {n} main characters",
        ],
        "item": "film",
    },
    "electronics": {
        "things": [
            "the battery life",
            "the screen",
            "the camera",
            "the keyboard",
            "the speaker",
            "the charger",
            "the build quality",
            "the software",
            "the touchpad",
            "the fan noise",
        ],
        "pos": [
            "excellent",
            "sharp",
            "reliable",
            "impressive",
            "fast",
            "solid",
            "responsive",
            "outstanding",
        ],
        "neg": ["terrible", "flimsy", "slow", "faulty", "awful", "unreliable", "laggy", "useless"],
        "facts": [
            "the laptop weighs about {n} hundred grams over a kilo",
            "it ships with {n} cables",
            "the phone comes in a {colour} case",
            "the update was released in {month}",
            "the box contains a manual and a charger",
            "it has {n} USB ports",
            "I bought it on {day}",
            "the screen is {n} inches wider than my old one",
            "the order was placed in {month}",
        ],
        "item": "laptop",
    },
    "hotel": {
        "things": [
            "the room",
            "the bed",
            "the breakfast",
            "the reception",
            "the view",
            "the pool",
            "the bathroom",
            "the location",
            "the wifi",
            "the cleaning staff",
        ],
        "pos": [
            "spotless",
            "comfortable",
            "lovely",
            "quiet",
            "spacious",
            "friendly",
            "perfect",
            "pleasant",
        ],
        "neg": [
            "dirty",
            "noisy",
            "cramped",
            "unhelpful",
            "shabby",
            "uncomfortable",
            "filthy",
            "poor",
        ],
        "facts": [
            "the hotel has {n} floors",
            "check-in starts at {hour}",
            "we stayed for {n} nights",
            "the station is {n} minutes away on foot",
            "the room faced the street",
            "we arrived on {day}",
            "the curtains are {colour}",
            "we visited in {month}",
            "breakfast is served from {hour}",
        ],
        "item": "hotel",
    },
    "book": {
        "things": [
            "the story",
            "the characters",
            "the writing",
            "the translation",
            "the final chapter",
            "the narrator",
            "the illustrations",
            "the argument",
            "the prose",
        ],
        "pos": [
            "captivating",
            "elegant",
            "insightful",
            "touching",
            "vivid",
            "thoughtful",
            "delightful",
            "engaging",
        ],
        "neg": [
            "tedious",
            "shallow",
            "clumsy",
            "repetitive",
            "flat",
            "pretentious",
            "messy",
            "dreary",
        ],
        "facts": [
            "the book has {n} hundred pages",
            "it was first published in {month}",
            "the author lives in Lisbon",
            "the paperback edition came out in {month}",
            "I read it on {day}",
            "the cover is {colour}",
            "it has {n} chapters",
            "I finished it in {n} days",
            "the library had {n} copies",
        ],
        "item": "book",
    },
    "service": {
        "things": [
            "the support agent",
            "the delivery",
            "the refund process",
            "the helpline",
            "the courier",
            "the installation",
            "the repair",
            "the booking system",
        ],
        "pos": [
            "quick",
            "helpful",
            "efficient",
            "patient",
            "smooth",
            "professional",
            "prompt",
            "courteous",
        ],
        "neg": [
            "slow",
            "useless",
            "careless",
            "confusing",
            "late",
            "unprofessional",
            "chaotic",
            "frustrating",
        ],
        "facts": [
            "the parcel arrived on {day}",
            "I called the helpline {n} times",
            "the order number starts with a {n}",
            "the technician came at {hour}",
            "the invoice was sent by email in {month}",
            "the box was {colour}",
            "the form had {n} pages",
            "my ticket was opened on {day}",
            "the courier rang at {hour}",
        ],
        "item": "service",
    },
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve"]
MONTHS = ["January", "March", "May", "June", "August", "October", "December"]
COLOURS = ["black", "white", "grey", "blue", "green", "red"]
HOURS = ["six", "seven", "eight", "nine", "noon", "half past five"]

INTENSIFIERS = ["", "", "", "really ", "very ", "truly ", "rather ", "extremely ", "quite "]
NEGATIONS = [
    "was not",
    "was not exactly",
    "wasn't",
    "was never",
    "was hardly",
    "was far from",
    "was not at all",
]
NEG_NEUTRALISE_POS = [("was not bad", 2), ("was not terrible", 2), ("wasn't awful", 2)]

# Single-opinion frames: {t} thing, {a} adjective (with intensifier), {i} item.
SINGLE = [
    "{t} was {a}.",
    "I found {t} {a}.",
    "Honestly, {t} was {a}.",
    "{T} turned out to be {a}.",
    "What I remember most is that {t} was {a}.",
    "{A} - that is the word for {t}.",
    "If you ask me, {t} is {a}.",
    "Overall {t} felt {a}.",
    "My friends agreed that {t} was {a}.",
    "For a {i} at this price, {t} was {a}.",
    "Everyone kept saying {t} was {a}, and they were right.",
    "{t} seemed {a} from the very first minute.",
    "I would describe {t} as {a}.",
    "It is fair to say {t} was {a}.",
]
NEGATED = [
    "{t} {neg} {a}.",
    "I would not call {t} {a}.",
    "Nobody could say {t} was {a}.",
    "{t} {neg} {a}, to be honest.",
    "Sadly, {t} {neg} {a}.",
    "I expected {t} to be {a}, but it wasn't.",
    "Calling {t} {a} would be a stretch.",
]
CONTRAST = [
    "{c1}, but {c2}.",
    "Although {c1}, {c2}.",
    "{c1}; however, {c2}.",
    "{C1}, yet {c2}.",
    "Even though {c1}, {c2}.",
    "{c1}, but in the end {c2}.",
    "While {c1}, {c2}.",
]
AGREE = [
    "{c1} and {c2}.",
    "{c1}, and on top of that {c2}.",
    "{C1}, and {c2} as well.",
    "{c1}; {c2} too.",
]
NEUTRAL = [
    "{f}.",
    "For the record, {f}.",
    "{F}, as far as I know.",
    "As mentioned in the listing, {f}.",
    "I have nothing to add except that {f}.",
    "Some parts of the {i} were good and some were poor.",
    "I cannot say yet whether I like the {i}.",
    "The {i} was neither great nor terrible.",
    "It was an ordinary {i}, nothing more and nothing less.",
    "I have not made up my mind about the {i}.",
    "Just noting that {f}.",
    "According to the receipt, {f}.",
    "It is worth knowing that {f}.",
    "{T} was fine in some ways and {a_neg} in others, so it evens out.",
]

# Held-out frames: these indices only appear in the test split.
HELD_OUT = {
    "single": {11, 12, 13},
    "negated": {6},
    "contrast": {5, 6},
    "agree": {3},
    "neutral": {9, 10},
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _clause(rng: random.Random, topic: dict, polarity: int) -> str:
    """'the X was (intensifier) ADJ' with the adjective's polarity; polarity -1 or +1."""
    t = rng.choice(topic["things"])
    a = rng.choice(INTENSIFIERS) + rng.choice(topic["pos" if polarity > 0 else "neg"])
    if rng.random() < 0.25:  # a negated clause of the opposite word
        b = rng.choice(topic["neg" if polarity > 0 else "pos"])
        return f"{t} {rng.choice(NEGATIONS)} {b}"
    return f"{t} was {a}"


def _frames(kind: str, frames: list[str], split: str) -> list[tuple[int, str]]:
    held = HELD_OUT[kind]
    keep = [(i, f) for i, f in enumerate(frames) if (i in held) == (split == "test")]
    return keep or list(enumerate(frames))


def make_example(rng: random.Random, split: str) -> dict:
    topic_name = rng.choice(sorted(TOPICS))
    topic = TOPICS[topic_name]
    kind = rng.choices(
        ["single", "negated", "contrast", "agree", "neutral"], weights=[3, 2, 3, 1, 3]
    )[0]
    t, i = rng.choice(topic["things"]), topic["item"]
    if kind == "single":
        pol = rng.choice([-1, 1])
        a = rng.choice(INTENSIFIERS) + rng.choice(topic["pos" if pol > 0 else "neg"])
        _, frame = rng.choice(_frames(kind, SINGLE, split))
        text = frame.format(t=t, T=_cap(t), a=a, A=_cap(a), i=i)
        label = 2 if pol > 0 else 0
    elif kind == "negated":
        if rng.random() < 0.15:  # "not bad" reads as mildly positive
            phrase, label = rng.choice(NEG_NEUTRALISE_POS)
            text = f"{_cap(t)} {phrase}, actually."
        else:
            pol = rng.choice([-1, 1])  # polarity of the word being negated
            a = rng.choice(topic["pos" if pol > 0 else "neg"])
            _, frame = rng.choice(_frames(kind, NEGATED, split))
            neg = rng.choice(NEGATIONS)
            text = frame.format(t=t, neg=neg, a=a)
            label = 0 if pol > 0 else 2
    elif kind in ("contrast", "agree"):
        p1 = rng.choice([-1, 1])
        p2 = -p1 if kind == "contrast" else p1
        c1, c2 = _clause(rng, topic, p1), _clause(rng, topic, p2)
        frames = CONTRAST if kind == "contrast" else AGREE
        _, frame = rng.choice(_frames(kind, frames, split))
        text = frame.format(c1=c1, C1=_cap(c1), c2=c2)
        label = 2 if p2 > 0 else 0
    else:
        _, frame = rng.choice(_frames(kind, NEUTRAL, split))
        f = rng.choice(topic["facts"]).format(
            day=rng.choice(DAYS),
            n=rng.choice(NUMBERS),
            month=rng.choice(MONTHS),
            colour=rng.choice(COLOURS),
            hour=rng.choice(HOURS),
        )
        text = frame.format(f=f, F=_cap(f), i=i, T=_cap(t), a_neg=rng.choice(topic["neg"]))
        label = 1
    text = _cap(" ".join(text.split()))
    return {"text": text, "label": LABELS[label], "topic": topic_name, "structure": kind}


def generate(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    """Write train/validation/test JSONL files under ``out_dir``; no sentence is in two splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    counts = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in SIZES.items():
        rows = []
        while len(rows) < n:
            ex = make_example(rng, split)
            if ex["text"] in seen:
                continue
            seen.add(ex["text"])
            rows.append(ex)
        with open(out_dir / f"{split}.jsonl", "w") as f:
            for ex in rows:
                f.write(json.dumps(ex) + "\n")
        counts[split] = len(rows)
    return counts


if __name__ == "__main__":
    print(generate(Path(__file__).resolve().parent / "reviews"))
