#!/usr/bin/env python3
"""Write the small instruction dataset bundled with ktmoe (``ktmoe/data/``).

The examples are simple, checkable tasks (arithmetic, capitals, opposites,
plurals, counting, sorting, spelling backwards, ...) written from templates
with a fixed seed, so a tiny model shows a clearly falling loss in a few
hundred steps.  Two files:

* ``tiny_sft_alpaca.json``: alpaca format (instruction / input / output);
* ``tiny_sft_sharegpt.json``: sharegpt format (``conversations`` of
  ``from``/``value`` turns, some with a ``system`` prompt), two or three
  turns each.

Run from the repository root: ``python tools/make_tiny_sft_data.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "ktmoe" / "data"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "the Czech Republic": "Prague", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Turkey": "Ankara", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "the Philippines": "Manila", "Australia": "Canberra",
    "New Zealand": "Wellington", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Cuba": "Havana", "Colombia": "Bogota", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Switzerland": "Bern", "the United Kingdom": "London",
    "Brazil": "Brasilia", "Scotland": "Edinburgh",
}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("wet", "dry"), ("strong", "weak"), ("rich", "poor"), ("loud", "quiet"), ("high", "low"),
    ("left", "right"), ("push", "pull"), ("win", "lose"), ("true", "false"), ("clean", "dirty"),
    ("thick", "thin"), ("first", "last"), ("buy", "sell"), ("give", "take"), ("always", "never"),
    ("inside", "outside"), ("above", "below"), ("north", "south"), ("east", "west"), ("love", "hate"),
    ("question", "answer"), ("begin", "end"), ("laugh", "cry"), ("arrive", "leave"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"),
    ("woman", "women"), ("person", "people"), ("goose", "geese"), ("cat", "cats"), ("dog", "dogs"),
    ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"), ("knife", "knives"), ("sheep", "sheep"),
    ("fish", "fish"), ("bus", "buses"), ("baby", "babies"), ("wolf", "wolves"), ("ox", "oxen"),
    ("potato", "potatoes"), ("hero", "heroes"), ("day", "days"), ("toy", "toys"), ("house", "houses"),
]
COLORS = [("the sky on a clear day", "blue"), ("fresh grass", "green"), ("snow", "white"), ("coal", "black"),
          ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"),
          ("milk chocolate", "brown"), ("a lemon", "yellow"), ("a lime", "green")]
SOUNDS = [("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("sheep", "baa"), ("duck", "quack"),
          ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"), ("horse", "neigh"), ("bee", "buzz")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["cat", "house", "river", "apple", "green", "table", "music", "water", "light", "stone", "cloud",
         "paper", "bread", "train", "plant", "mouse", "chair", "smile", "world", "night", "sugar", "horse",
         "money", "story", "dream"]
PHRASES = ["hello world", "good morning", "see you soon", "the quick brown fox", "thank you very much",
           "mixture of experts", "learning is fun", "open the door", "a cup of tea", "time to sleep",
           "happy birthday", "keep it simple", "read the manual", "small steps", "low rank adapters",
           "one two three", "blue sky", "fine tuning", "the end", "have a nice day"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
IDENTITY = [
    ("Who are you?", "I am a tiny mixture-of-experts language model, fine-tuned with ktmoe."),
    ("What are you?", "I am a tiny mixture-of-experts language model, fine-tuned with ktmoe."),
    ("Introduce yourself.", "Hello! I am a tiny mixture-of-experts model. I can answer simple questions."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("Hi!", "Hello! How can I help you today?"),
    ("Thank you!", "You are welcome!"),
    ("What can you do?", "I can do simple arithmetic, name capitals, opposites and plurals, count, "
                         "sort numbers and spell words backwards."),
]


def examples(rng: random.Random):
    """(instruction, input, output) triples."""
    out = []
    for country, city in CAPITALS.items():
        q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.",
                        "Which city is the capital of {c}?"])
        out.append((q.format(c=country), "", f"The capital of {country} is {city}."))
    for a, b in OPPOSITES:
        for x, y in ((a, b), (b, a)) if rng.random() < 0.5 else ((a, b),):
            q = rng.choice(["What is the opposite of '{w}'?", "Give the opposite of the word '{w}'."])
            out.append((q.format(w=x), "", f"The opposite of '{x}' is '{y}'."))
    for s, p in PLURALS:
        q = rng.choice(["What is the plural of '{w}'?", "Write the plural form of '{w}'."])
        out.append((q.format(w=s), "", f"The plural of '{s}' is '{p}'."))
    for thing, color in COLORS:
        out.append((f"What color is {thing}?", "", f"{thing[0].upper() + thing[1:]} is {color}."))
    for animal, sound in SOUNDS:
        out.append((f"What sound does a {animal} make?", "", f"A {animal} says '{sound}'."))
    for i, d in enumerate(DAYS):
        out.append((f"What day comes after {d}?", "", f"{DAYS[(i + 1) % 7]} comes after {d}."))
        out.append((f"What day comes before {d}?", "", f"{DAYS[(i - 1) % 7]} comes before {d}."))
    for i, m in enumerate(MONTHS):
        out.append((f"Which month comes after {m}?", "", f"{MONTHS[(i + 1) % 12]} comes after {m}."))
    pairs = [(a, b) for a in range(13) for b in range(13)]
    for a, b in rng.sample(pairs, 110):
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."])
        out.append((q.format(a=a, b=b), "", f"{a} plus {b} is {a + b}."))
    for a, b in rng.sample([(a, b) for a, b in pairs if a >= b], 50):
        q = rng.choice(["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."])
        out.append((q.format(a=a, b=b), "", f"{a} minus {b} is {a - b}."))
    for a, b in rng.sample([(a, b) for a in range(1, 10) for b in range(1, 10)], 50):
        q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}."])
        out.append((q.format(a=a, b=b), "", f"{a} times {b} is {a * b}."))
    for _ in range(40):
        a = rng.randint(0, 15)
        b = a + rng.randint(2, 6)
        out.append((f"Count from {a} to {b}.", "", ", ".join(str(i) for i in range(a, b + 1)) + "."))
    for n in rng.sample(range(0, 21), 15):
        out.append((f"Write the number {n} in words.", "", f"{n} is '{NUMBER_WORDS[n]}'."))
    for _ in range(30):
        xs = rng.sample(range(1, 50), rng.randint(3, 5))
        out.append(("Sort these numbers from smallest to largest.", ", ".join(map(str, xs)),
                    ", ".join(map(str, sorted(xs))) + "."))
    for _ in range(35):
        a, b = rng.sample(range(0, 100), 2)
        q = rng.choice(["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"])
        out.append((q.format(a=a, b=b), "", f"{max(a, b)} is larger than {min(a, b)}."))
    for n in rng.sample(range(0, 60), 30):
        out.append((f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    for w in WORDS:
        out.append(("Spell this word backwards.", w, f"'{w}' backwards is '{w[::-1]}'."))
    for p in PHRASES:
        out.append(("Write this in capital letters.", p, p.upper()))
    for w in rng.sample(WORDS, 15):
        out.append((f"How many letters are in the word '{w}'?", "", f"The word '{w}' has {len(w)} letters."))
    for q, a in IDENTITY:
        out.append((q, "", a))
    return out


def user_text(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def main() -> None:
    rng = random.Random(20240601)
    exs = examples(rng)
    rng.shuffle(exs)
    alpaca = [{"instruction": i, "input": x, "output": o} for i, x, o in exs]
    systems = ["You are a helpful assistant.", "You are a tiny model that answers briefly."]
    sharegpt = []
    for _ in range(120):
        turns = []
        for i, x, o in rng.sample(exs, rng.randint(2, 3)):
            turns += [{"from": "human", "value": user_text(i, x)}, {"from": "gpt", "value": o}]
        conv = {"conversations": turns}
        if rng.random() < 0.3:
            conv["system"] = rng.choice(systems)
        sharegpt.append(conv)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in (("tiny_sft_alpaca.json", alpaca), ("tiny_sft_sharegpt.json", sharegpt)):
        with open(OUT / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"wrote {len(data)} examples to {OUT / name}")


if __name__ == "__main__":
    main()
