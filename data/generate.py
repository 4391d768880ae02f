"""Write the course's small offline corpora from a seeded grammar: no text comes from elsewhere.

    python data/generate.py            # rewrites data/*.txt and data/*.tsv, byte for byte the same
    python data/generate.py --check    # exits 1 if the committed files differ from a fresh run

What the files carry, and which notebook needs it:
- corpus.txt: English-like sentences for the character and word language models (01-05).
  Nouns of four categories appear in contexts typical of their category, so a model
  pre-trained on the corpus learns which nouns behave alike.
- senses.tsv: sentences using six two-sense words (bank, bat, spring, plant, bark, match),
  each sense in its own kind of context, for ELMo's word-sense probe (03). The same kinds of
  sentence also appear in the corpus, so a biLM sees both senses during training.
- classification_{train,test}.tsv: "which category is the noun in this sentence?" in neutral
  sentences that give no hint of the category. The test nouns never appear in the training
  set, so only what pre-training learned about those nouns can classify them (04).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

PEOPLE = ["the farmer", "my sister", "his brother", "the teacher", "an old man", "the girl",
          "the boy", "our neighbour", "the doctor", "my father", "her mother", "the baker",
          "a young woman", "the sailor", "my uncle", "the student"]
TIMES = ["yesterday", "in the morning", "last week", "after school", "on sunday",
         "in the evening", "that winter", "at noon", "early on monday", "before dinner"]

# Category -> nouns. The first half of each list is used by the classification training set,
# the second half only by its test set.
NOUNS = {
    "food": ["apple", "bread", "cheese", "soup", "rice", "cake", "pear", "plum",
             "carrot", "potato", "onion", "cookie", "pie", "noodle", "tomato", "lemon"],
    "animal": ["horse", "rabbit", "fox", "wolf", "deer", "goat", "sheep", "tiger",
               "bear", "mouse", "owl", "duck", "eagle", "lion", "donkey", "squirrel"],
    "vehicle": ["truck", "bus", "car", "tractor", "van", "taxi", "train", "bicycle",
                "scooter", "wagon", "tram", "motorbike", "jeep", "ambulance", "lorry", "minibus"],
    "tool": ["hammer", "drill", "wrench", "chisel", "shovel", "axe", "rake", "ladder",
             "screwdriver", "spanner", "crowbar", "clamp", "mallet", "trowel", "pickaxe", "sander"],
}
CONTEXTS = {
    "food": ["{p} baked the {n} in the oven", "{p} ate the {n} for dinner",
             "{p} bought a fresh {n} at the market", "the {n} tasted sweet and warm",
             "{p} sliced the {n} on the kitchen table", "the cook served the {n} with salt",
             "{p} was hungry and wanted the {n}", "the {n} was cooked for lunch",
             "{p} put the {n} on a plate", "the {n} smelled delicious"],
    "animal": ["the {n} ran across the field", "{p} fed the {n} in the barn",
               "the wild {n} hunted in the forest", "the {n} slept in its den",
               "{p} saw the {n} drinking from the stream", "the {n} had soft fur",
               "the hungry {n} chased its prey", "{p} heard the {n} in the woods at night",
               "the young {n} followed its mother", "the {n} hid from the hunters"],
    "vehicle": ["{p} drove the {n} to town", "the {n} needed new tires",
                "{p} parked the {n} near the station", "the {n} carried passengers along the road",
                "the engine of the {n} was loud", "{p} washed the {n} in the garage",
                "the {n} stopped at the traffic light", "{p} filled the {n} with fuel",
                "the old {n} broke down on the highway", "{p} rode in the {n} to work"],
    "tool": ["{p} used the {n} to fix the shelf", "the carpenter kept the {n} in the toolbox",
             "{p} sharpened the {n} in the workshop", "{p} borrowed the {n} to repair the fence",
             "the {n} lay on the workbench", "the builder held the {n} with both hands",
             "{p} bought a new {n} at the hardware store", "the steel {n} was heavy",
             "{p} hung the {n} on the wall of the shed", "the {n} helped {p} build a cabinet"],
}
NEUTRAL = ["i thought about the {n} all day", "{p} talked about the {n} yesterday",
           "there was a picture of the {n} in the book", "{p} remembered the {n} from last year",
           "everyone asked about the {n}", "{p} wrote a story about the {n}",
           "the word {n} was on the list", "{p} pointed at the {n}",
           "we could not forget the {n}", "{p} drew the {n} in a notebook"]

# Two-sense word -> (sense names, templates per sense). `{w}` is the word itself.
SENSES = {
    "bank": (("river", "money"), (
        ["{p} sat on the {w} of the river", "the muddy {w} was covered in reeds",
         "the river flooded over its {w}", "{p} fished from the grassy {w}",
         "ducks rested on the {w} near the water", "the boat drifted toward the {w} of the stream",
         "{p} walked along the {w} by the lake", "the steep {w} rose above the water"],
        ["{p} opened an account at the {w}", "the {w} lent money to {p}",
         "{p} deposited the cash at the {w}", "the {w} raised its interest rates",
         "{p} asked the {w} for a loan", "the clerk at the {w} counted the coins",
         "{p} paid the bills at the {w}", "the {w} closed at noon on friday"])),
    "bat": (("animal", "sport"), (
        ["a {w} flew out of the cave at night", "the {w} hung upside down in the barn",
         "{p} saw a {w} catching insects at dusk", "the little {w} slept all day in the attic",
         "the {w} used echoes to find its prey", "a {w} with dark wings circled the tower",
         "the {w} woke up when the sun went down", "a sleepy {w} clung to the roof of the cave"],
        ["{p} swung the {w} and hit the ball", "the wooden {w} cracked during the game",
         "{p} held the {w} tightly before the pitch", "the coach gave {p} a heavier {w}",
         "the {w} and the ball were in the sports bag", "{p} practiced with the {w} every afternoon",
         "the player dropped the {w} and ran to first base", "{p} signed the {w} after the game"])),
    "spring": (("season", "coil"), (
        ["flowers bloom in the {w}", "{p} planted seeds in the {w}",
         "the {w} brought warm rain to the valley", "birds return to the north every {w}",
         "the days grow longer in the {w}", "{p} cleaned the house in the {w}",
         "the snow melted early that {w}", "lambs are born in the {w}"],
        ["the {w} in the old clock broke", "{p} replaced the {w} in the mattress",
         "the metal {w} stretched and snapped back", "the pen needed a new {w}",
         "a tight {w} powered the toy car", "{p} oiled the rusty {w} of the door",
         "the {w} under the seat squeaked", "the mechanic wound the {w} too tight"])),
    "plant": (("flora", "factory"), (
        ["{p} watered the {w} on the windowsill", "the {w} grew green leaves",
         "the tall {w} needed more sunlight", "{p} put the {w} in a bigger pot",
         "the {w} bloomed with small red flowers", "the roots of the {w} were dry",
         "{p} trimmed the leaves of the {w}", "the young {w} sprouted from a seed"],
        ["the workers at the {w} assembled engines", "the power {w} burned coal all night",
         "{p} got a job at the {w}", "the {w} produced steel for cars",
         "the chemical {w} closed last year", "the manager of the {w} hired new workers",
         "smoke rose from the chimney of the {w}", "the {w} shipped machines to the port"])),
    "bark": (("tree", "dog"), (
        ["the {w} of the oak was rough", "{p} peeled the {w} from the branch",
         "moss grew on the {w} of the tree", "the beetle hid under the {w}",
         "the {w} of the birch was white", "{p} carved a name into the {w} of the pine",
         "the deer chewed the {w} of the young trees", "thick {w} protects the trunk"],
        ["{p} heard the loud {w} of the dog", "the {w} of the puppy woke everyone",
         "the dog gave a sharp {w} at the stranger", "a {w} echoed from the yard",
         "the guard dog let out a deep {w}", "{p} knew the {w} of the old hound",
         "one {w} from the dog scared the cat", "the {w} of the dogs kept {p} awake"])),
    "match": (("fire", "game"), (
        ["{p} struck a {w} to light the candle", "the {w} flared in the dark room",
         "the last {w} was wet and would not light", "{p} lit the stove with a {w}",
         "the {w} burned down to the fingers of {p}", "a single {w} lit the campfire",
         "{p} blew out the {w} after lighting the lamp", "the {w} hissed and caught fire"],
        ["our team won the {w} on saturday", "the {w} ended in a draw",
         "{p} watched the football {w} on television", "the tennis {w} lasted three hours",
         "fans cheered loudly during the {w}", "{p} scored twice in the {w}",
         "the referee stopped the {w} because of rain", "the final {w} was sold out"])),
}
GENERIC = ["{p} walked to the village", "{p} opened the window and looked outside",
           "the sun was warm and the sky was clear", "{p} read a book by the fire",
           "the wind blew through the trees", "{p} smiled and said nothing",
           "the road was long and quiet", "{p} wrote a letter to a friend",
           "it rained all afternoon", "{p} closed the door and went to sleep",
           "the house was small but warm", "{p} laughed at the old story"]
JOINERS = [" and then ", " because ", " while ", " but ", " so "]


def _fill(rng: random.Random, template: str, **slots: str) -> str:
    return template.format(p=rng.choice(PEOPLE), **slots)


def _clause(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        cat = rng.choice(list(NOUNS))
        return _fill(rng, rng.choice(CONTEXTS[cat]), n=rng.choice(NOUNS[cat]))
    if r < 0.8:
        word = rng.choice(list(SENSES))
        return _fill(rng, rng.choice(SENSES[word][1][rng.randrange(2)]), w=word)
    return _fill(rng, rng.choice(GENERIC))


def corpus(rng: random.Random, lines: int) -> list[str]:
    out = []
    for _ in range(lines):
        s = _clause(rng)
        if rng.random() < 0.3:
            s += rng.choice(JOINERS) + _clause(rng)
        if rng.random() < 0.25:
            s = rng.choice(TIMES) + ", " + s
        out.append(s + ".")
    return out


def senses(rng: random.Random, per_sense: int) -> list[str]:
    rows = ["sentence\tword\tsense\tsense_name\tposition"]
    for word, (names, templates) in SENSES.items():
        for sense in (0, 1):
            for _ in range(per_sense):
                s = _fill(rng, rng.choice(templates[sense]), w=word)
                rows.append(f"{s}\t{word}\t{sense}\t{names[sense]}\t{s.split().index(word)}")
    return rows


def classification(rng: random.Random, per_noun: int, half: int) -> list[str]:
    rows = ["text\tlabel\tlabel_name"]
    for label, (cat, nouns) in enumerate(NOUNS.items()):
        for noun in nouns[half * 8:(half + 1) * 8]:
            for template in rng.sample(NEUTRAL, per_noun):
                rows.append(f"{_fill(rng, template, n=noun)}\t{label}\t{cat}")
    return rows


def files() -> dict[str, str]:
    rng = random.Random(SEED)
    return {
        "corpus.txt": "\n".join(corpus(rng, 24000)) + "\n",
        "senses.tsv": "\n".join(senses(rng, 40)) + "\n",
        "classification_train.tsv": "\n".join(classification(rng, 6, 0)) + "\n",
        "classification_test.tsv": "\n".join(classification(rng, 6, 1)) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: data/)")
    args = ap.parse_args(argv)
    differ = []
    for name, text in files().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                differ.append(name)
        else:
            path.write_text(text)
    if differ:
        print(f"differ from a fresh run: {differ}; run python data/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
