"""Dense-fact retrieval items, generated from the project's own templates (no data needed).

Each item is a document of many short facts of one kind set inside filler prose (staff records, a
shipping ledger, patient lab values, agents and their code names), one question about one fact,
and six candidate answers of the same kind: the right one, two that the document states for other
facts and three it never mentions. A model that did not read the detail can only guess (1 in 6),
so a compacted cache must keep the detail, bound to the right fact, to answer; candidates are ranked by log-likelihood, so a
small model has a meaningful full-context accuracy.

Several sentence forms per family, the order of attributes and the filler vary with the seed; the
asked fact sits at a random depth. `make_item(seed, family, target_tokens, count_tokens)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FIRST = ["Maria", "Tomas", "Aiko", "Levan", "Priya", "Oskar", "Nadia", "Ruben", "Hana", "Emeka", "Ines", "Pavel",
         "Sofia", "Kwame", "Lena", "Marco", "Yusuf", "Greta", "Diego", "Mei", "Anton", "Zara", "Felix", "Amara",
         "Jonas", "Leila", "Bruno", "Ayla", "Victor", "Noor", "Elias", "Carmen", "Idris", "Vera", "Hugo", "Talia"]
LAST = ["Okafor", "Lindqvist", "Tanaka", "Beridze", "Raman", "Novak", "Haddad", "Silva", "Ito", "Mensah", "Duarte",
        "Kowalski", "Rossi", "Boateng", "Fischer", "Moreau", "Aydin", "Berg", "Castillo", "Chen", "Petrov", "Farouk",
        "Keller", "Nwosu", "Larsen", "Karimi", "Costa", "Demir", "Hughes", "Rahman", "Vogel", "Ortega", "Bello"]
CITIES = ["Tampere", "Porto", "Kraków", "Nagoya", "Tbilisi", "Accra", "Valencia", "Leeds", "Bergen", "Izmir", "Lyon",
          "Graz", "Quito", "Mysore", "Cork", "Dakar", "Turku", "Bari", "Riga", "Split", "Malmö", "Tartu", "Ghent"]
JOBS = ["welder", "pharmacist", "surveyor", "baker", "electrician", "librarian", "pilot", "carpenter", "nurse",
        "geologist", "translator", "plumber", "chemist", "tailor", "architect", "mechanic", "florist", "drafter"]
GOODS = ["lemons", "copper wire", "wool blankets", "olive oil", "rice", "timber", "glass jars", "coffee beans",
         "salt", "paper", "cotton", "tiles", "apples", "nails", "soap", "rope", "honey", "tea", "flour", "cement"]
PORTS = ["Halden", "Varna", "Brest", "Kotka", "Bilbao", "Gdynia", "Rijeka", "Sfax", "Arhus", "Larne", "Ancona",
         "Klaipeda", "Setubal", "Cadiz", "Narvik", "Durres", "Trieste", "Tromso", "Fowey", "Koper"]
ANIMALS = ["Falcon", "Badger", "Heron", "Lynx", "Otter", "Raven", "Cobra", "Marten", "Ibex", "Kestrel", "Puma",
           "Wolverine", "Gecko", "Osprey", "Jackal", "Bison", "Mantis", "Stork", "Viper", "Condor", "Hare", "Egret",
           "Panther", "Walrus", "Beetle", "Magpie", "Coyote", "Ferret", "Oriole", "Salmon", "Tapir", "Hornet",
           "Pelican", "Dingo", "Bobcat", "Cricket", "Moose", "Parrot", "Shark", "Weasel", "Yak", "Zebra"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SUBJECTS = ["The office", "The old clock in the hall", "Most of the staff", "The canteen", "A delivery van",
            "The night guard", "The printer on the second floor", "The small garden", "The heating", "The lift",
            "The director's assistant", "A group of visitors", "The river path", "The annual report", "The new intern"]
PREDICATES = ["was repainted", "ran a few minutes late", "stayed quiet", "was busier than usual", "needed repairs",
              "was mentioned at the meeting", "caused a small delay", "was praised in the newsletter",
              "smelled of fresh coffee", "was closed for cleaning", "drew a few complaints", "worked without trouble"]
TIMES = ["that spring", "on most Mondays", "after the holiday", "during the long rain", "for a week or so",
         "early in the morning", "late in the afternoon", "before the inspection", "in the first cold week",
         "all through the summer"]


def _filler(rng: np.random.Generator) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)} {rng.choice(TIMES)}."




@dataclass
class Item:
    family: str
    document: str
    question: str
    lead: str              # how the answer starts (the assistant's turn); a candidate follows after a space
    candidates: list[str]  # the right answer first
    depth: float           # position of the asked fact in the document, 0..1


@dataclass
class Fact:
    sentence: str
    key: str        # what the question names (unique in the document)
    answer: str     # the asked attribute's value
    question: str
    lead: str


def _unique(rng: np.random.Generator, make: Callable[[], str], seen: set) -> str:
    for _ in range(1000):
        v = make()
        if v not in seen:
            seen.add(v)
            return v
    raise RuntimeError("ran out of distinct values")


def _records(rng, seen):
    name = _unique(rng, lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}", seen.setdefault("name", set()))
    city, job = str(rng.choice(CITIES)), str(rng.choice(JOBS))
    badge = _unique(rng, lambda: str(int(rng.integers(1000, 9999))), seen.setdefault("badge", set()))
    a = "an" if job[0] in "aeiou" else "a"
    forms = [f"{name} is {a} {job} from {city}; the badge number is {badge}.",
             f"Badge {badge} belongs to {name}, who works as {a} {job} in {city}.",
             f"In {city} lives {name}, {a} {job}, badge number {badge}.",
             f"{name} ({a} {job} in {city}) was issued badge number {badge}."]
    asked = rng.integers(3)
    if asked == 0:
        return Fact(str(rng.choice(forms)), name, badge, f"What is the badge number of {name}?", f"The badge number of {name} is"), "badge"
    if asked == 1:
        return Fact(str(rng.choice(forms)), name, city, f"In which city does {name} live?", f"{name} lives in"), "city"
    return Fact(str(rng.choice(forms)), name, f"{a} {job}", f"What is the job of {name}?", f"{name} works as"), "job"


def _ledger(rng, seen):
    pair = _unique(rng, lambda: f"{rng.choice(GOODS)}|{rng.choice(PORTS)}", seen.setdefault("pair", set()))
    goods, port = pair.split("|")
    count = _unique(rng, lambda: str(int(rng.integers(100, 990))), seen.setdefault("count", set()))
    day, month = int(rng.integers(1, 29)), str(rng.choice(MONTHS))
    forms = [f"On {month} {day}, {count} crates of {goods} were shipped to {port}.",
             f"The ledger shows {count} crates of {goods} sent to {port} on {month} {day}.",
             f"{port} received {count} crates of {goods} ({month} {day}).",
             f"Shipment to {port}, {month} {day}: {goods}, {count} crates."]
    return Fact(str(rng.choice(forms)), pair, count,
                f"How many crates of {goods} were shipped to {port}?",
                f"The number of crates of {goods} shipped to {port} was"), "count"


def _labs(rng, seen):
    name = _unique(rng, lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}", seen.setdefault("name", set()))
    glucose = _unique(rng, lambda: str(int(rng.integers(100, 240))), seen.setdefault("glucose", set()))
    potassium = f"{rng.uniform(3.1, 5.6):.1f}"
    rate = int(rng.integers(52, 118))
    forms = [f"Patient {name}: glucose {glucose} mg/dL, potassium {potassium} mmol/L, heart rate {rate}.",
             f"For {name} the lab reported a glucose of {glucose} mg/dL and potassium {potassium}.",
             f"{name}, heart rate {rate}, had glucose at {glucose} mg/dL on admission.",
             f"Glucose {glucose} mg/dL was measured for patient {name} (potassium {potassium})."]
    return Fact(str(rng.choice(forms)), name, glucose,
                f"What was the glucose of patient {name}?", f"The glucose of {name} was"), "glucose"


def _agents(rng, seen):
    animal = _unique(rng, lambda: str(rng.choice(ANIMALS)), seen.setdefault("animal", set()))
    name = _unique(rng, lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}", seen.setdefault("name", set()))
    city = str(rng.choice(CITIES))
    forms = [f"The agent code-named {animal} is {name}, stationed in {city}.",
             f"{name} operates in {city} under the code name {animal}.",
             f"Code name {animal}: {name}, based in {city}.",
             f"In {city}, {name} was known only as {animal}."]
    return Fact(str(rng.choice(forms)), animal, name,
                f"Who is the agent code-named {animal}?", f"The agent code-named {animal} is"), "name"


FAMILIES = {"records": _records, "ledger": _ledger, "labs": _labs, "agents": _agents}


def make_item(seed: int, family: str, target_tokens: int, count_tokens: Callable[[str], int],
              filler: tuple[int, int] = (2, 4)) -> Item:
    """A document of about `target_tokens` tokens (as `count_tokens` counts them) of `family` facts,
    each followed by filler[0]..filler[1] filler sentences, the question about one fact, and six
    candidates (right one first)."""
    rng = np.random.default_rng(seed)
    make = FAMILIES[family]
    seen: dict = {}
    facts: list[tuple[Fact, str]] = []
    parts: list[str] = []
    # Grow in whole facts (each with its filler) until the document reaches the target and some
    # fact has at least two others of its kind (the distractors stated in the document).
    def askable() -> list[int]:
        by_kind: dict[str, set] = {}
        for f, kind in facts:
            by_kind.setdefault(kind, set()).add(f.answer)
        return [i for i, (f, kind) in enumerate(facts) if len(by_kind[kind] - {f.answer}) >= 2]

    while True:
        try:
            fact, kind = make(rng, seen)
        except RuntimeError:
            break
        facts.append((fact, kind))
        parts.append(fact.sentence)
        for _ in range(int(rng.integers(filler[0], filler[1] + 1))):
            parts.append(_filler(rng))
        if count_tokens(" ".join(parts)) >= target_tokens and askable():
            break
    choices = askable()
    if not choices:
        raise ValueError(f"no {family} question possible: {len(facts)} facts")
    by_kind: dict[str, list[int]] = {}
    for i, (_, kind) in enumerate(facts):
        by_kind.setdefault(kind, []).append(i)
    asked = int(rng.choice(choices))
    fact, kind = facts[asked]
    # Two distractors the document states for other facts (the detail must be bound to the right
    # fact), three it never mentions (the detail must have survived at all).
    others = sorted({facts[j][0].answer for j in by_kind[kind]} - {fact.answer})
    inside = [str(x) for x in rng.choice(others, size=2, replace=False)]
    outside: list[str] = []
    stated = {f.answer for f, _ in facts}
    for _ in range(1000):
        if len(outside) == 3:
            break
        extra, extra_kind = make(rng, {})
        if extra_kind == kind and extra.answer not in stated and extra.answer not in outside:
            outside.append(extra.answer)
    distractors = inside + outside
    sentence_index = parts.index(fact.sentence)
    return Item(family, " ".join(parts), fact.question, fact.lead, [fact.answer, *distractors], sentence_index / max(1, len(parts) - 1))
