"""A data folder in the layout the evaluation tools read (`niah_essays/*.txt`,
`leval/quality.jsonl`), written from the project's own text, so that the tests need nothing beside
the repository. The evaluations themselves take public data through --data / KVCOMPACT_DATA_DIR."""
import json
import os

from kvcompact.demo import CONTEXT, QUESTIONS

# A second text, so that the haystacks and the capped read have more than one file to draw from.
RIVER = """\
The river Tay-Orm rises in the peat hills forty kilometres inland and reaches the sea at Ness after \
passing six villages, two mills and a ford that carts used until the Low Bridge was built. In spring \
the water runs brown with melted snow and carries branches down to the harbour, where the boys of \
the town fish them out to dry for the bonfire on midsummer night. In August the level drops so far \
that the stepping stones below the Chain Bridge show again, and the oldest of them still carries the \
date 1659 cut by a ferryman who wanted to be remembered.

The mill at Kell ground barley until 1931 and oats until 1957. Its wheel, nine metres across, was \
restored by volunteers in 2004 and now turns on the first weekend of every month for visitors. The \
miller's house beside it holds a small collection of tools, a ledger of the flour sold between 1880 \
and 1920, and a photograph of the flood of 1903, when the water rose above the second window and \
the miller's family spent two nights in the loft with their goats. A stone in the garden wall marks \
the height the water reached. Downstream, the weir at Sorn keeps a pool deep enough for swimming, \
and the village holds a race across it on the longest day of the year, won most often by the \
postman's daughters."""


def write_data_dir(path: str) -> str:
    os.makedirs(os.path.join(path, "niah_essays"), exist_ok=True)
    os.makedirs(os.path.join(path, "leval"), exist_ok=True)
    for name, text in (("ness.txt", CONTEXT), ("river.txt", RIVER)):
        with open(os.path.join(path, "niah_essays", name), "w", encoding="utf-8") as f:
            f.write(text)
    item = {"input": CONTEXT + "\n\n" + RIVER, "instructions": QUESTIONS, "outputs": [""] * len(QUESTIONS),
            "source": "kvcompact", "evaluation": "llm"}
    with open(os.path.join(path, "leval", "quality.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps(item) + "\n")
    return path
