"""Build the short-answer extraction example data (written by us; every name, company and number
is made up) for reinforcement fine-tuning.

    python examples/rft/build_data.py        # writes examples/rft/train.jsonl and test.jsonl

Every line is OpenAI's reinforcement fine-tuning format: `messages` (a system prompt and a user
turn, no answer) plus the fields the grader (grader.json) reads: `answer`, the value to extract
exactly as written in the text, and `field`, the kind of value asked for (order number, amount,
date, person, tracking number, room, time). The user turn is a short business text (a support
ticket, shipping note, invoice email, meeting note, ...) and one question about it. About half
the texts hold a second value of the asked kind (two dates, two amounts, ...), so the question has
to be read, not just the first date copied. The test split uses its own seed, texts, questions,
names and companies, and a few value formats training never shows (PO-, JJD, euro amounts,
24-hour times), so it measures extraction rather than recall.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261211
N_TRAIN, N_TEST = 240, 60
KINDS = ("order", "amount", "date", "person", "tracking", "room", "time")
FIELD = {"order": "order number", "amount": "amount", "date": "date", "person": "person",
         "tracking": "tracking number", "room": "room", "time": "time"}

SYSTEM = ("You extract one value from a short business text. Reply with the value only, exactly as it "
          "is written in the text: no quotes, no label, no extra words, no full stop.")

# Texts: {slot} placeholders; a slot's kind is its name without the trailing digit ({date2} is a
# date). `ask` maps the slots a question may ask for to their questions; None takes the kind's
# generic questions (only where the text holds one value of that kind). `before` lists pairs of
# slots of one kind whose values must come in that order (an earlier date or time); `scale` makes
# an amount a multiple of another (a total from its VAT, a price after tax from the one before).
# Other slots ({company}, {carrier}, {product}, {n}) are fillers and never asked for.
TRAIN_TEXTS = [
    {"text": "Hi, my order {order} arrived with a cracked lid. I paid {amount} and would rather have a "
             "replacement than a refund. Thanks, {person}",
     "ask": {"order": None, "amount": ["How much did the customer pay?"], "person": ["Who wrote the ticket?"]}},
    {"text": "Order {order} was split into two parcels. The first ships today with tracking {tracking}; "
             "the second follows on {date}.",
     "ask": {"order": None, "tracking": None, "date": ["When does the second parcel ship?"]}},
    {"text": "Please find attached our invoice for {product}. The total due is {amount}, of which {amount2} "
             "is VAT. Kind regards, {company}",
     "ask": {"amount": ["What is the total due?", "What is the invoice total?"],
             "amount2": ["How much of the invoice is VAT?"]},
     "scale": [("amount2", "amount", 5.0, 6.0)]},
    {"text": "Design review moved from {date2} to {date}, {time} in room {room}. {person} will present "
             "the mockups.",
     "ask": {"date": ["What is the new date of the design review?", "When is the design review now?"],
             "date2": ["What was the original date of the design review?"],
             "time": None, "room": None, "person": ["Who will present the mockups?"]}},
    {"text": "Your parcel from {company} is on its way. Tracking number: {tracking}. Expected delivery: {date}.",
     "ask": {"tracking": None, "date": ["When is the parcel expected?", "What is the expected delivery date?"]}},
    {"text": "Reminder: the fire drill is on {date} at {time}. Assemble outside room {room} and report to "
             "{person}.",
     "ask": {"date": None, "time": None, "room": None, "person": ["Who should people report to?"]}},
    {"text": "We have refunded {amount} for order {order}. The remaining {amount2} was paid in store credit "
             "and stays on your account.",
     "ask": {"amount": ["How much was refunded?"], "amount2": ["How much stays on the account as store credit?"],
             "order": None}},
    {"text": "Hi team, {person} is covering for {person2} until {date}. Please send urgent requests to the "
             "cover, not to the shared inbox.",
     "ask": {"person": ["Who is covering?", "Who should urgent requests go to?"],
             "person2": ["Who is being covered for?"], "date": ["Until when is the cover arranged?"]}},
    {"text": "Two orders are on hold: {order} is awaiting payment and {order2} needs an address check.",
     "ask": {"order": ["Which order is awaiting payment?"], "order2": ["Which order needs an address check?"]}},
    {"text": "Room {room} is booked for the budget workshop on {date}. If it gets too full, we move to "
             "room {room2}.",
     "ask": {"room": ["Which room is booked for the workshop?"], "room2": ["Which is the backup room?"],
             "date": None}},
    {"text": "The courier came by at {time2} but nobody was in. The next delivery window opens at {time}.",
     "ask": {"time": ["When does the next delivery window open?"],
             "time2": ["At what time did the courier come by?"]},
     "before": [("time2", "time")]},
    {"text": "Invoice for order {order}: {amount} including shipping. Payment received with thanks, {person}.",
     "ask": {"order": None, "amount": None, "person": ["Who signed the message?"]}},
    {"text": "The return label for order {order} is attached. Drop the box at any {carrier} point; its "
             "tracking code is {tracking}.",
     "ask": {"order": None, "tracking": None}},
    {"text": "{person} from {company} called at {time} about the late shipment. Please call back before {time2}.",
     "ask": {"person": ["Who called?"], "time": ["When did the call come in?"],
             "time2": ["By what time should the call be returned?"]},
     "before": [("time", "time2")]},
    {"text": "Quote for {n} office chairs: {amount2} in total, plus {amount} for delivery, valid until {date}.",
     "ask": {"amount": ["How much is the delivery?"], "amount2": ["What is the total for the chairs?"],
             "date": ["Until when is the quote valid?"]},
     "scale": [("amount", "amount2", 4.0, 30.0)]},
    {"text": "Visitor {person} arrives on {date} at {time}. Please meet the visitor at reception and go up "
             "to room {room}.",
     "ask": {"person": ["Who is the visitor?"], "date": None, "time": None, "room": None}},
    {"text": "Update on order {order}: the carrier replaced tracking code {tracking2} with {tracking} "
             "because the first label was damaged.",
     "ask": {"tracking": ["What is the new tracking code?"], "tracking2": ["Which tracking code was replaced?"],
             "order": None}},
    {"text": "Interview with {person} for the analyst role: {date}, {time}, room {room}. {person2} and I "
             "will run it.",
     "ask": {"person": ["Who is the candidate?"], "person2": ["Besides the writer, who will run the interview?"],
             "date": None, "time": None, "room": None}},
    {"text": "Expense claim from {person}: taxi {amount2}, hotel {amount}. Please approve it by {date}.",
     "ask": {"amount": ["How much was the hotel?"], "amount2": ["How much was the taxi?"],
             "person": ["Who filed the expense claim?"], "date": ["By when should the claim be approved?"]}},
    {"text": "Heads up: the heating in room {room} will be off on {date} from {time}. Staff can use room "
             "{room2} instead.",
     "ask": {"room": ["Which room will have the heating off?"], "room2": ["Which room can staff use instead?"],
             "date": None, "time": ["From what time will the heating be off?"]}},
    {"text": "Sorry, order {order} is backordered. We now expect to ship it on {date} instead of {date2}.",
     "ask": {"date": ["What is the new expected ship date?"], "date2": ["What was the original ship date?"],
             "order": None},
     "before": [("date2", "date")]},
    {"text": "Our records show {amount} still open for order {order}. A late fee applies after {date}.",
     "ask": {"amount": ["How much is still open?"], "order": None,
             "date": ["After what date does a late fee apply?"]}},
    {"text": "Your parcel {tracking} is held at the {carrier} depot. Collect it by {date} with ID; the desk "
             "opens at {time}.",
     "ask": {"tracking": None, "date": ["By when must the parcel be collected?"],
             "time": ["When does the desk open?"]}},
    {"text": "Please hand the keys to {person} at the front desk at {time}; {person2} has already left for "
             "the day.",
     "ask": {"person": ["Who should get the keys?"], "person2": ["Who has already left for the day?"],
             "time": None}},
]

TEST_TEXTS = [
    {"text": "Customer {person} writes that package {tracking} shows as delivered, but nothing is at the "
             "door. Order reference {order}.",
     "ask": {"person": ["Which customer is this about?"], "tracking": None, "order": None}},
    {"text": "Statement for {company}: balance {amount}; last payment of {amount2} received on {date}.",
     "ask": {"amount": ["What is the balance on the statement?"], "amount2": ["How large was the last payment?"],
             "date": ["On which date was the last payment received?"]}},
    {"text": "Offsite planning moves to room {room} at {time}; the {time2} slot is cancelled.",
     "ask": {"room": None, "time": ["At what time does the planning session start now?"],
             "time2": ["Which time slot is cancelled?"]}},
    {"text": "Dear {person}, your plan renews on {date} for {amount}. Cancel before {date2} to avoid the charge.",
     "ask": {"date": ["On what date does the plan renew?"], "date2": ["What is the cancellation deadline?"],
             "amount": ["What will the renewal cost?"], "person": ["To whom is the message addressed?"]},
     "before": [("date2", "date")]},
    {"text": "Lost and found: a laptop bag was left in room {room} on {date}. {person} at security is "
             "keeping it.",
     "ask": {"room": ["In which room was the bag left?"], "date": None, "person": ["Who has the bag now?"]}},
    {"text": "Warehouse note: the pallet for {order} is picked and labelled {tracking}; the pallet for "
             "{order2} waits for stock.",
     "ask": {"order": ["Which order's pallet has been picked?"], "order2": ["Which order is waiting for stock?"],
             "tracking": None}},
    {"text": "Could {person2} sign for the delivery of order {order}? {person} is out of the office until {date}.",
     "ask": {"person": ["Who is out of the office?"], "person2": ["Who is asked to sign for the delivery?"],
             "order": None, "date": ["When is the absent colleague back?"]}},
    {"text": "Invoice received from {company}: {amount} before tax, {amount2} after tax, due on {date}.",
     "ask": {"amount": ["What is the amount before tax?"], "amount2": ["What is the amount after tax?"],
             "date": ["When is the invoice due?"]},
     "scale": [("amount", "amount2", 1.05, 1.25)]},
    {"text": "The auditor, {person}, will work from room {room} starting {date} at {time}.",
     "ask": {"person": ["What is the auditor's name?"], "room": None, "date": None, "time": None}},
    {"text": "Courier pickup for return {tracking} is booked on {date} between {time2} and {time}.",
     "ask": {"tracking": None, "date": None, "time": ["When does the pickup window end?"],
             "time2": ["When does the pickup window begin?"]},
     "before": [("time2", "time")]},
    {"text": "From {company}: the payment of {amount} for order {order} failed. Please update your card "
             "before {date}.",
     "ask": {"amount": ["How much was the failed payment?"], "order": None, "date": None}},
    {"text": "The two boxes of order {order} ship separately: the large one as {tracking}, the small one "
             "as {tracking2}.",
     "ask": {"tracking": ["What is the tracking number of the large box?"],
             "tracking2": ["What is the tracking number of the small box?"], "order": None}},
    {"text": "Correction: the vendor demo is in room {room}, not in room {room2} as the invite said.",
     "ask": {"room": ["Where is the vendor demo actually held?"], "room2": ["Which room did the invite give?"]}},
]

# Questions for a kind the text holds once: (train, test).
GENERIC = {
    "order": (["What is the order number?", "Which order is this about?", "What order number is mentioned?"],
              ["Give the order reference.", "Which order does the note refer to?"]),
    "amount": (["What is the amount?", "How much money is mentioned?"],
               ["What sum is given?"]),
    "date": (["What is the date?", "On which date?", "What date is given?"],
             ["Which day is it on?", "Give the date."]),
    "person": (["What is the person's name?"], ["Which person is named?"]),
    "tracking": (["What is the tracking number?", "What is the tracking code?", "Which tracking number is given?"],
                 ["Give the shipment's tracking reference.", "What is the parcel's tracking ID?"]),
    "room": (["Which room?", "What is the room?", "In which room?"],
             ["Which room is it in?", "Give the room."]),
    "time": (["At what time?", "What time is given?", "What is the time?"],
             ["What time is it set for?", "Give the time."]),
}

# People, companies and carriers (all invented): (train, test).
FIRST = (["Maya", "Tomas", "Priya", "Lukas", "Hannah", "Omar", "Greta", "Daniel", "Ines", "Felix", "Aisha",
          "Jonas", "Clara", "Mateo", "Nora", "Samuel", "Yuki", "Leon", "Farah", "Oscar"],
         ["Beatrix", "Kwame", "Sofia", "Anders", "Leila", "Rafael", "Mirela", "Theo", "Ingrid", "Tariq"])
LAST = (["Okafor", "Lindqvist", "Ramirez", "Brennan", "Novak", "Hartmann", "Sato", "Moreau", "Kowalski", "Fischer",
         "Delgado", "Whitfield", "Andersen", "Marsh", "Castellano", "Ibsen", "Quinn", "Petrov"],
        ["Oyelaran", "Szabo", "Valdivia", "Holmgren", "Nakamura", "Achterberg", "Ferreira", "Duquesne"])
COMPANIES = (["Brightmoor Supplies", "Kestrel Office Co.", "Pinewick Foods", "Harbor & Vale", "Lumen Print Works",
              "Northgate Tools", "Copperleaf Studio", "Bluefen Logistics"],
             ["Amberly Textiles", "Quillstone Ltd.", "Rivermark Hardware", "Saltmarsh Coffee"])
CARRIERS = (["Swiftline", "ParcelHop", "Roadrunner Post"], ["Skylark Freight"])
PRODUCTS = ["March catering", "the website redesign", "printer toner", "the spring workshop", "two laptop stands",
            "the warehouse racking", "translation services"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ALNUM = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(n - 1))


def value(rng: random.Random, kind: str, split: int, currency: str) -> tuple[str, float]:
    """A value of `kind` as it is written in the text, and a number to order it by."""
    if kind == "order":
        forms = [lambda: f"ORD-{digits(rng, 5)}", lambda: f"SO-{digits(rng, 6)}"]
        forms += [lambda: f"PO-{digits(rng, 4)}-{rng.randint(10, 99)}"] if split else [lambda: digits(rng, 7)]
        return rng.choice(forms)(), 0
    if kind == "amount":
        cents = rng.choice([0, 0, rng.randint(1, 99)])
        amount = rng.choice([rng.randint(5, 99), rng.randint(100, 999), rng.randint(1000, 9999)]) + cents / 100
        return f"{currency}{amount:,.2f}", amount
    if kind == "date":
        month, day = rng.randrange(12), rng.randint(1, 28)
        return f"{MONTHS[month]} {day}", month * 31 + day
    if kind == "person":
        return f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}", 0
    if kind == "tracking":
        forms = [lambda: "1Z" + "".join(rng.choice(ALNUM) for _ in range(16)), lambda: f"TRK{digits(rng, 9)}"]
        if split:
            forms.append(lambda: f"JJD{digits(rng, 14)}")
        return rng.choice(forms)(), 0
    if kind == "room":
        form = rng.randrange(3)
        if form == 0:
            return f"{rng.choice('ABCDE')}-{rng.randint(1, 5)}{rng.randint(0, 3)}{rng.randint(1, 9)}", 0
        if form == 1:
            return f"{rng.randint(1, 6)}.{rng.randint(1, 24):02d}", 0
        return f"{rng.randint(1, 9)}{rng.randint(0, 4)}{rng.randint(1, 9)}", 0
    if kind == "time":
        hour, minute = rng.randint(7, 18), rng.choice([0, 15, 30, 45])
        if split and rng.random() < 0.4:
            return f"{hour:02d}:{minute:02d}", hour * 60 + minute
        return f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}", hour * 60 + minute
    raise ValueError(kind)


def kind_of(slot: str) -> str:
    return slot.rstrip("0123456789")


def has_distractor(template: dict, slot: str) -> bool:
    names = set(re.findall(r"\{(\w+)\}", template["text"]))
    return any(kind_of(other) == kind_of(slot) for other in names - {slot})


def fill(rng: random.Random, template: dict, split: int) -> dict[str, str] | None:
    """Values for every slot, or None when two of them overlap (one inside another: "March 1" in
    "March 14"), which would make the answer ambiguous."""
    values, keys = {}, {}
    currency = rng.choice(["$", "$", "€"] if split else ["$", "$", "£"])  # one per text
    for slot in dict.fromkeys(re.findall(r"\{(\w+)\}", template["text"])):
        kind = kind_of(slot)
        if kind in KINDS:
            values[slot], keys[slot] = value(rng, kind, split, currency)
        elif kind == "company":
            values[slot] = rng.choice(COMPANIES[split])
        elif kind == "carrier":
            values[slot] = rng.choice(CARRIERS[split])
        elif kind == "product":
            values[slot] = rng.choice(PRODUCTS)
        elif kind == "n":
            values[slot] = str(rng.randint(4, 40))
    for small, large, low, high in template.get("scale", []):
        values[large] = f"{currency}{keys[small] * rng.uniform(low, high):,.2f}"
    for earlier, later in template.get("before", []):
        if keys[earlier] == keys[later]:
            return None
        if keys[earlier] > keys[later]:
            values[earlier], values[later] = values[later], values[earlier]
    shown = list(values.values())
    if any(a != b and a in b for a in shown for b in shown) or len(set(shown)) < len(shown):
        return None
    return values


def row(rng: random.Random, split: int, kind: str, distractor: bool) -> dict:
    texts = (TRAIN_TEXTS, TEST_TEXTS)[split]
    choices = [(t, slot) for t in texts for slot in t["ask"]
               if kind_of(slot) == kind and has_distractor(t, slot) == distractor]
    template, slot = rng.choice(choices)
    while (values := fill(rng, template, split)) is None:
        pass
    questions = template["ask"][slot] or GENERIC[kind][split]
    text = template["text"].format(**values)
    content = f"{text}\n\nQuestion: {rng.choice(questions)}"
    answer = values[slot]
    assert content.count(answer) == 1, (content, answer)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
            "answer": answer, "field": FIELD[kind]}


def split_rows(seed: int, split: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    plan = [(KINDS[i % len(KINDS)], i % 2 == 0) for i in range(n)]  # kinds evenly, distractors every other row
    rng.shuffle(plan)
    return [row(rng, split, kind, distractor) for kind, distractor in plan]


def build() -> None:
    # One generator per split: the test rows stay the same when the training texts change.
    train = split_rows(SEED, 0, N_TRAIN)
    test = split_rows(SEED + 1, 1, N_TEST)
    seen = {r["messages"][1]["content"] for r in train}
    assert not any(r["messages"][1]["content"] in seen for r in test)
    for name, rows in (("train", train), ("test", test)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fields = {f: sum(r["field"] == f for r in rows) for f in FIELD.values()}
        print(f"{HERE / name}.jsonl: {len(rows)} lines; " + ", ".join(f"{f} {c}" for f, c in fields.items()))


if __name__ == "__main__":
    build()
