"""Writes the embedded sample (`train.jsonl.gz`, `test.jsonl.gz`): HH-format preference pairs,
made up here (not copied from HH), so the quickstart runs offline.

Each pair shares a templated multi-turn dialogue; the chosen last reply is on-topic, polite and
useful, the rejected one is rude, a refusal, off-topic or empty of content. The difference is
lexical on purpose, so a 2-layer reward model learns it within a few hundred steps and the
quickstart shows accuracy rising. Deterministic: `python data_prep/sample/make_sample.py` rewrites
byte-identical files (gzip mtime fixed to 0).
"""
from __future__ import annotations

import gzip
import json
import os
import random

TOPICS = {
    "cooking": (["make a weeknight pasta", "bake bread at home", "cook rice that is not sticky",
                 "season roasted vegetables", "make a simple soup"],
                ["Start with good olive oil and salt the water well.",
                 "Measure by weight, it is more reliable than cups.",
                 "Rinse the rice and use a little less water than you think.",
                 "Roast at a high heat so the edges caramelize.",
                 "Taste as you go and adjust the seasoning at the end.",
                 "Prepare all the ingredients before you turn on the stove."]),
    "travel": (["pack light for a week away", "find cheaper flights", "plan a trip to a new city",
                "avoid jet lag", "travel with a small budget"],
               ["Roll your clothes and pick items that mix and match.",
                "Compare prices on several days and book a few weeks ahead.",
                "Make a short list of must-see places and leave free time.",
                "Shift your sleep an hour a day before you leave and drink water.",
                "Stay in hostels or guesthouses and eat where locals eat.",
                "Keep a copy of your documents in a separate bag."]),
    "fitness": (["start running", "build a simple workout routine", "stretch after exercise",
                 "stay motivated to exercise", "improve my posture"],
                ["Begin with short intervals of running and walking.",
                 "Three sessions a week of whole-body exercises is a solid start.",
                 "Hold each stretch for about thirty seconds and breathe slowly.",
                 "Track your progress and celebrate small wins.",
                 "Strengthen your back and set up your desk at eye level.",
                 "Rest days matter as much as training days."]),
    "programming": (["learn Python", "debug a crashing program", "write cleaner code",
                     "use version control", "prepare for a coding interview"],
                    ["Build a small project you care about, step by step.",
                     "Read the error message carefully and reproduce the bug in a tiny example.",
                     "Give functions clear names and keep them short.",
                     "Commit small changes often with messages that explain why.",
                     "Practice common problems and explain your thinking out loud.",
                     "Write a test first so you know when the fix works."]),
    "gardening": (["grow tomatoes", "keep houseplants alive", "start a compost pile",
                   "grow herbs on a balcony", "get rid of garden pests naturally"],
                  ["Give them at least six hours of sun and water at the base.",
                   "Check the soil with your finger before watering.",
                   "Mix green scraps with dry leaves and turn the pile weekly.",
                   "Use pots with drainage holes and a light potting mix.",
                   "Plant marigolds nearby and pick pests off by hand.",
                   "Mulch helps the soil keep its moisture."]),
    "money": (["save money each month", "make a budget", "pay off a credit card",
               "start an emergency fund", "spend less on groceries"],
              ["Set up an automatic transfer to savings on payday.",
               "Write down every expense for a month to see where it goes.",
               "Pay more than the minimum and target the highest interest first.",
               "Aim for three months of expenses, starting with a small goal.",
               "Plan meals for the week and shop with a list.",
               "Review subscriptions and cancel the ones you do not use."]),
    "studying": (["study for an exam", "remember what I read", "focus while studying",
                  "take better notes", "learn a new language"],
                 ["Use short sessions with breaks and test yourself often.",
                  "Summarize each chapter in your own words.",
                  "Put your phone in another room and use a timer.",
                  "Write key ideas as questions you can answer later.",
                  "Practice a little every day and speak with native speakers.",
                  "Teaching the material to a friend shows what you still miss."]),
    "pets": (["train a puppy", "help my cat lose weight", "introduce a new pet at home",
              "keep my dog calm during storms", "choose a first pet"],
             ["Reward good behavior right away with a treat and praise.",
              "Measure food portions and play with your cat every day.",
              "Keep them apart at first and let them swap scents.",
              "Give your dog a quiet safe space and stay calm yourself.",
              "Think about how much time and space you have for care.",
              "A regular visit to the vet keeps small problems small."]),
}
OPENERS = ["Sure, happy to help!", "Great question.", "Of course.", "Good idea to ask.",
           "Certainly, here are some ideas.", "Glad you asked."]
CLOSERS = ["I hope this helps!", "Let me know if you would like more detail.",
           "Good luck, you can do this.", "Feel free to ask a follow-up question.",
           "Happy to explain any step further."]
RUDE = ["That is a stupid question.", "Ugh, figure it out yourself.", "Why would anyone care?",
        "Stop wasting my time.", "You clearly know nothing about this.", "What a dumb idea."]
REFUSE = ["I can't help with that.", "I won't answer that.", "No. Ask someone else.",
          "I don't want to talk about this.", "Not my problem."]
OFF_TOPIC = ["Did you know octopuses have three hearts?", "I like trains more than people.",
             "The moon is not made of cheese, probably.", "Bananas are technically berries.",
             "My favorite color is beige.", "Anyway, have you seen any good movies lately?"]
SHORT = ["Whatever.", "Meh.", "Dunno.", "Maybe. Or not.", "Who knows."]
GREETINGS = ["Hi there.", "Hello!", "Hey, quick question.", "Good morning.", "Hi, can you help me?"]
ACKS = ["Hello! What can I help you with today?", "Hi! Sure, what would you like to know?",
        "Of course, ask away."]
FOLLOW_UPS = ["Thanks. Anything else I should know?", "What is the most important part?",
              "Is there a common mistake to avoid?", "How long does it usually take?"]


def helpful(rng: random.Random, tips) -> str:
    return " ".join([rng.choice(OPENERS)] + rng.sample(tips, 2) + [rng.choice(CLOSERS)])


def unhelpful(rng: random.Random) -> str:
    style = rng.choice(["rude", "refuse", "off_topic", "short", "mixed"])
    if style == "rude":
        return " ".join(rng.sample(RUDE, 2))
    if style == "refuse":
        return rng.choice(REFUSE) + " " + rng.choice(RUDE)
    if style == "off_topic":
        return " ".join(rng.sample(OFF_TOPIC, 2))
    if style == "short":
        return rng.choice(SHORT)
    return rng.choice(REFUSE) + " " + rng.choice(OFF_TOPIC)


def dialogue(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    questions, tips = TOPICS[topic]
    turns = []
    if rng.random() < 0.5:
        turns.append((rng.choice(GREETINGS), rng.choice(ACKS)))
    q = rng.choice(questions)
    ask = rng.choice(["How do I {q}?", "What is the best way to {q}?", "Can you tell me how to {q}?",
                      "I want to {q}. Any tips?"]).format(q=q)
    if rng.random() < 0.4:  # one more exchange before the reply being judged
        turns.append((ask, helpful(rng, tips)))
        ask = rng.choice(FOLLOW_UPS)
    prefix = "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in turns)
    last = f"\n\nHuman: {ask}\n\nAssistant:"
    return {"chosen": f"{prefix}{last} {helpful(rng, tips)}",
            "rejected": f"{prefix}{last} {unhelpful(rng)}"}


def write(path: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = [json.dumps(dialogue(rng)) for _ in range(n)]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    write(os.path.join(here, "train.jsonl.gz"), 640, seed=20240601)
    write(os.path.join(here, "test.jsonl.gz"), 160, seed=20240602)


if __name__ == "__main__":
    main()
