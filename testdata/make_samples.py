"""Write the small sample files that the scripts' smoke commands read (`python testdata/make_samples.py`).

Made-up sentences from the templates below, written for this project (free to redistribute with it): a
text for train_lm.py, a sentiment TSV for train_sst.py and a sentence-pair TSV for train_mnli.py, all
lower-cased and cut as SST and PTB are cut ("does n't"). They make every command run from a fresh clone
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


if __name__ == "__main__":
    main()
