"""Write the small sample files that the scripts' smoke commands read (`python testdata/make_samples.py`).

Made-up sentences from the templates below, written for this project (free to redistribute with it): a
text for train_lm.py, a sentiment TSV for train_sst.py and a sentence-pair TSV for train_mnli.py, all
lower-cased and cut as SST and PTB are cut ("does n't"); and for probe.py, the same kind of sentences with
part-of-speech tags, with CoNLL-2000 chunks, and two ambiguous words in contexts that tell their senses. They make every command run from a fresh clone
in seconds; they are not data to measure anything on (RESULTS.md says where the real data sets come from).
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
GOOD = "great wonderful moving funny charming clever beautiful gripping".split()
BAD = "dull awful boring clumsy tedious silly bland predictable".split()
THINGS = "film movie story plot script cast ending soundtrack".split()
PEOPLE = "the director|the actor|the actress|her brother|the critic|a child|the old man|my friend".split("|")
DOES = "plays|watches|reads|writes|sings|cooks|paints|builds".split("|")
OBJECTS = "a song|the guitar|a letter|a book|dinner|a picture|a house|the news".split("|")


def review(rng, good: bool) -> str:
    adjective = rng.choice(GOOD if good else BAD)
    thing = rng.choice(THINGS)
    templates = [f"the {thing} is {adjective} .", f"a {adjective} {thing} , from start to finish .",
                 f"{rng.choice(PEOPLE)} says the {thing} is {adjective} .",
                 f"it 's a {adjective} {thing} and i {'loved' if good else 'hated'} it .",
                 f"the {thing} does n't feel {rng.choice(BAD if good else GOOD)} ; it is {adjective} ."]
    return rng.choice(templates)


def sentence(rng) -> str:
    who, does, what = rng.choice(PEOPLE), rng.choice(DOES), rng.choice(OBJECTS)
    return rng.choice([f"{who} {does} {what} .", f"yesterday {who} {does} {what} in the garden .",
                       f"{who} never {does} {what} on sunday .", review(rng, rng.random() < 0.5)])


def pair(rng):
    who, does, what = rng.choice(PEOPLE), rng.choice(DOES), rng.choice(OBJECTS)
    premise = f"{who} {does} {what} in the kitchen ."
    label = rng.choice(["entailment", "neutral", "contradiction"])
    hypothesis = {"entailment": f"{who} {does} {what} .",
                  "neutral": f"{who} {does} {what} for a friend .",
                  "contradiction": f"{who} never {does} anything ."}[label]
    return premise, hypothesis, label


# probe.py's samples: (words, POS tags, chunk tags) for each phrase of the templates
TAGGED_PEOPLE = [("the director", "DT NN", "B-NP I-NP"), ("her brother", "PRP$ NN", "B-NP I-NP"),
                 ("a child", "DT NN", "B-NP I-NP"), ("the old man", "DT JJ NN", "B-NP I-NP I-NP"),
                 ("my friend", "PRP$ NN", "B-NP I-NP")]
TAGGED_OBJECTS = [("a song", "DT NN", "B-NP I-NP"), ("dinner", "NN", "B-NP"), ("the news", "DT NN", "B-NP I-NP"),
                  ("a letter", "DT NN", "B-NP I-NP")]
SENSES = {"line": {"text": ["she read the first {} of the poem aloud .", "the actor forgot his {} again ."],
                   "phone": ["please hold the {} for a moment .", "the {} went dead during the call ."],
                   "cord": ["he tied the boat with a strong {} .", "hang the wet shirts on the {} ."]},
          "play": {"theatre": ["we saw a {} by shakespeare last night .", "the {} opens on broadway in may ."],
                   "game": ["the children {} in the garden .", "they {} chess every sunday ."]}}


def tagged_sentence(rng):
    """-> [(word, POS tag, chunk tag)] of one made-up sentence."""
    phrases = [rng.choice(TAGGED_PEOPLE), (rng.choice(DOES), "VBZ", "B-VP"), rng.choice(TAGGED_OBJECTS)]
    if rng.random() < 0.5:
        phrases += [("in the garden", "IN DT NN", "B-PP B-NP I-NP")]
    if rng.random() < 0.3:
        phrases.insert(0, ("yesterday", "NN", "B-NP"))
    phrases.append((".", ".", "O"))
    return [token for words, tags, chunks in phrases for token in zip(words.split(), tags.split(), chunks.split())]


def write_probe_samples(rng):
    with open(os.path.join(HERE, "sample_pos.txt"), "w") as pos, \
            open(os.path.join(HERE, "sample_chunk.txt"), "w") as chunk:
        for _ in range(150):
            tokens = tagged_sentence(rng)
            pos.write("".join(f"{w}\t{t}\n" for w, t, _ in tokens) + "\n")
            chunk.write("".join(f"{w} {t} {c}\n" for w, t, c in tokens) + "\n")
    with open(os.path.join(HERE, "sample_wsd.tsv"), "w") as f:
        f.write("word\tsense\tposition\ttext\n")
        for _ in range(120):
            word = rng.choice(sorted(SENSES))
            sense = rng.choice(sorted(SENSES[word]))
            text = rng.choice(SENSES[word][sense]).format(word)
            f.write(f"{word}\t{sense}\t{text.split().index(word)}\t{text}\n")


def main():
    rng = random.Random(0)
    with open(os.path.join(HERE, "sample_text.txt"), "w") as f:
        f.writelines(sentence(rng) + "\n" for _ in range(3000))
    with open(os.path.join(HERE, "sample_valid.txt"), "w") as f:
        f.writelines(sentence(rng) + "\n" for _ in range(300))
    with open(os.path.join(HERE, "sample_sst.tsv"), "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(400):
            f.write(f"{review(rng, i % 2 == 1)}\t{i % 2}\n")
    with open(os.path.join(HERE, "sample_nli.tsv"), "w") as f:
        f.write("premise\thypothesis\tlabel\n")
        for _ in range(400):
            f.write("\t".join(pair(rng)) + "\n")
    write_probe_samples(random.Random(1))


if __name__ == "__main__":
    main()
