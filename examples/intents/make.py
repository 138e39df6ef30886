"""Writes a support-intent classification set (ours, written for slmtune; no third-party text).

    python examples/intents/make.py      # -> train.jsonl (288 rows), test.jsonl (96 rows)

Eight intents of a fictional online shop's support inbox, rows `{"text", "label"}` for the
classification task (slmtune/tasks/classification.py). Training rows are built from one set of
phrasings; test rows from other openings, other wordings of each request and other details, so
the test measures whether the intent was learned rather than the sentences. Used by the
"defaults" check: the shipped recipes/classification/lora.yaml with only its data paths changed
(tests/test_auto.py, docs/benchmarks.md "The auto rule").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# intent: (training requests, test requests); details are filled into {x}
INTENTS = {
    "reset_password": (
        ["I forgot my password", "I can't log in because I lost my password", "please reset my password",
         "my password doesn't work anymore", "how do I change my login password"],
        ["the sign-in page keeps rejecting my credentials, I need a new one", "locked out, need to set up a new pass phrase",
         "I don't remember what I used to sign in"]),
    "cancel_subscription": (
        ["cancel my subscription", "I want to stop my monthly plan", "please end my membership",
         "how do I unsubscribe from the premium plan", "stop charging me every month, I'm leaving"],
        ["I no longer want the recurring plan, terminate it", "I'd like to quit the membership program",
         "turn off auto-renewal and close my plan"]),
    "update_billing": (
        ["I need to update my credit card", "change the card you charge", "my card expired, how do I add a new one",
         "update my payment method", "use a different bank card for my payments"],
        ["new debit card, please swap it on my account", "I want to pay with PayPal from now on instead",
         "the billing details on file are outdated"]),
    "track_order": (
        ["where is my order", "my package hasn't arrived yet", "can you track my parcel",
         "when will my delivery come", "what's the status of my shipment"],
        ["the box I bought still hasn't shown up", "is my purchase on its way?",
         "I'm waiting for the courier, any news on the parcel"]),
    "return_item": (
        ["I want to return this item", "how do I send back a product", "I'd like a refund for my purchase",
         "the shoes don't fit, can I return them", "please take back the jacket I bought"],
        ["this blender isn't what I expected, I want my money back", "can I exchange it or ship it back",
         "need a return label for the lamp"]),
    "report_bug": (
        ["the app crashes when I open it", "your website shows an error page", "the checkout button doesn't work",
         "I found a bug in the search", "the page freezes every time I click"],
        ["something is broken: the cart empties itself", "getting a blank screen after the update",
         "the filters throw an exception on my phone"]),
    "change_address": (
        ["I moved, please update my address", "change my delivery address", "ship to my new home instead",
         "my shipping address is wrong", "update the street on my account"],
        ["we relocated last week, new postcode for deliveries", "send future orders to my office instead of home",
         "the flat number on my profile is outdated"]),
    "contact_human": (
        ["I want to talk to a person", "can I speak with an agent", "connect me to customer service",
         "is there a human I can call", "let me chat with real support staff"],
        ["stop the bot, get me someone from your team", "I need a representative on the phone",
         "please have a staff member reach out to me"]),
}
TRAIN_FRAMES = ["{r}", "Hi, {r}.", "Hello, {r}, thanks", "{r}!", "Quick question: {r}?", "{r}, order {x}",
                "Hey there, {r} ({x})", "Good morning. {r}."]
TEST_FRAMES = ["Hiya - {r}", "Dear support team, {r}. Regards", "urgent: {r}", "{r}. Account {x}.",
               "yo {r}", "Excuse me, {r}?"]


def detail(rng: random.Random) -> str:
    return f"#{rng.randint(10000, 99999)}"


def rows_for(requests: list[str], frames: list[str], n: int, rng: random.Random, label: str) -> list[dict]:
    combos = [(r, f) for r in requests for f in frames]
    rng.shuffle(combos)
    out = []
    for request, frame in combos[:n]:
        text = frame.format(r=request, x=detail(rng))
        out.append({"text": text[0].upper() + text[1:], "label": label})
    return out


def main() -> None:
    rng = random.Random(11)
    train, test = [], []
    for label, (train_requests, test_requests) in INTENTS.items():
        train += rows_for(train_requests, TRAIN_FRAMES, 36, rng, label)
        test += rows_for(test_requests, TEST_FRAMES, 12, rng, label)
    rng.shuffle(train)
    rng.shuffle(test)
    (HERE / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (HERE / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    print(f"{len(train)} training rows, {len(test)} test rows, {len(INTENTS)} intents")


if __name__ == "__main__":
    main()
