"""Build the tool-use example data (written by us): requests to three functions with typed arguments
(an alarm clock, the weather, a currency converter), plus requests no function serves.

    python examples/tools/build_data.py        # writes examples/tools/train.jsonl and test.jsonl

Every line is OpenAI's fine-tuning chat format with function calling: `tools`, the user's request,
and the assistant's `tool_calls` (or a plain answer). Some training lines go on with the tool's
result and the assistant's answer, so the model also learns to read results. The test split uses
phrasings, cities and labels that never occur in training, so it measures whether the model
learned to map requests to calls rather than to recall sentences. (The training phrasings, cities
and no-call questions were widened once, after the first evaluation; the test split was not changed.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261204
N_TRAIN, N_TEST = 150, 60
NO_CALL_SHARE = (0.2, 0.15)  # train, test

TOOLS = [
    {"type": "function", "function": {
        "name": "set_alarm", "description": "Set an alarm on the user's phone (24-hour clock).",
        "parameters": {"type": "object", "properties": {
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "minute": {"type": "integer", "minimum": 0, "maximum": 59},
            "label": {"type": "string", "description": "What the alarm is for"}},
            "required": ["hour", "minute"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "description": "ISO 4217 code, e.g. USD"},
            "to_currency": {"type": "string", "description": "ISO 4217 code, e.g. EUR"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
]

# Phrasings per function: (train, test). {hh}:{mm} is a 24-hour time, written as the argument values are.
ALARM = ([
    "Set an alarm for {hh}:{mm}.",
    "Wake me up at {hh}:{mm}.",
    "Please set an alarm at {hh}:{mm}.",
    "I need an alarm at {hh}:{mm} tomorrow.",
    "Alarm at {hh}:{mm}, please.",
    "Can you wake me at {hh}:{mm}?",
    "I have to get up at {hh}:{mm}.",
    "Get me up at {hh}:{mm}.",
    "Start an alarm for {hh}:{mm}.",
    "Set my alarm to {hh}:{mm}.",
    "I want to be woken at {hh}:{mm}.",
    "Don't let me oversleep: alarm at {hh}:{mm}.",
], [
    "Could you put an alarm on for {hh}:{mm}?",
    "Make sure I'm up by {hh}:{mm}.",
    "Ring me at {hh}:{mm}.",
])
ALARM_LABELED = ([
    "Set an alarm for {hh}:{mm} called {label}.",
    "Remind me at {hh}:{mm} with an alarm named {label}.",
    "Alarm at {hh}:{mm} for {label}.",
    "Create a {label} alarm at {hh}:{mm}.",
    "Set a {hh}:{mm} alarm with the label {label}.",
    "{label} alarm at {hh}:{mm}, please.",
], [
    "Add a {hh}:{mm} alarm labelled {label}.",
])
WEATHER = ([
    "What's the weather in {city}?",
    "How is the weather in {city} right now?",
    "Tell me the weather for {city}.",
    "Is it cold in {city} today?",
    "Weather in {city}, please.",
    "Is it sunny in {city}?",
    "Check the weather in {city}.",
    "Will it rain in {city} today?",
    "What's the forecast for {city} right now?",
    "How hot is it in {city}?",
], [
    "Do I need an umbrella in {city}?",
    "What's it like outside in {city}?",
    "Give me the current conditions in {city}.",
])
WEATHER_UNIT = ([
    "What's the temperature in {city} in {unit}?",
    "Weather in {city}, in {unit} please.",
    "Temperature in {city} in {unit}.",
    "Check the weather in {city} and give it in {unit}.",
    "How cold is {city}? Use {unit}.",
], [
    "How warm is {city}? Answer in {unit}.",
])
CURRENCY = ([
    "Convert {amount} {src} to {dst}.",
    "How much is {amount} {src} in {dst}?",
    "What are {amount} {src} worth in {dst}?",
    "Change {amount} {src} into {dst}.",
    "{amount} {src} to {dst}, please.",
    "Please convert {amount} {src} into {dst}.",
    "I want to know {amount} {src} in {dst}.",
    "Turn {amount} {src} into {dst}.",
], [
    "If I have {amount} {src}, how many {dst} is that?",
    "Exchange {amount} {src} for {dst}.",
    "What do {amount} {src} come to in {dst}?",
])
NO_CALL = ([
    ("Tell me a joke about cats.", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Say hello in Spanish.", "Hola!"),
    ("How many days are in a week?", "A week has seven days."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nquiet drops on the window,\nthe garden drinks deep."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Thanks for your help!", "You're welcome!"),
    ("Why is the sky blue?", "Air scatters blue light more than red light, so the sky looks blue."),
    ("How do rainbows form?", "Sunlight is split into colours by raindrops, which bend and reflect it."),
    ("What is a cloud made of?", "Tiny droplets of water or ice crystals floating in the air."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun."),
    ("What do bees make?", "Bees make honey."),
    ("Spell the word house backwards.", "esuoh"),
], [
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name three fruits.", "Apples, bananas and oranges."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Give me a synonym for happy.", "Cheerful."),
])

# Many training cities, so the model learns to copy the name it is given rather than recall a few.
CITIES = (["Oslo", "Paris", "Lima", "Tokyo", "Cairo", "Berlin", "Toronto", "Sydney", "Madrid", "Nairobi",
           "Seoul", "Dublin", "Boston", "Munich", "Dakar", "Osaka", "Bergen", "Porto", "Delhi", "Chicago",
           "Manila", "Zurich", "Helsinki", "Bogota", "Austin", "Krakow", "Accra", "Leeds", "Tunis", "Riga",
           "Phoenix", "Geneva", "Santiago", "Hamburg", "Kyoto", "Malmo", "Dallas", "Lagos", "Milan", "Prague"],
          ["Lisbon", "Denver", "Hanoi", "Quito", "Vienna", "Perth"])
LABELS = (["gym", "meeting", "medicine", "school run", "flight"], ["yoga", "dentist", "laundry"])
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "NOK", "INR"]


def call_line(rng: random.Random, split: int) -> tuple[str, str, dict]:
    """(user request, function name, arguments) for one call, phrased from the split's templates."""
    kind = rng.choice(["alarm", "weather", "currency"])
    if kind == "alarm":
        hour, minute = rng.randrange(24), rng.choice([0, 0, 5, 10, 15, 20, 30, 30, 40, 45, 50, 55])
        fill = {"hh": f"{hour:02d}", "mm": f"{minute:02d}"}
        arguments = {"hour": hour, "minute": minute}
        if rng.random() < 0.3:
            label = rng.choice(LABELS[split])
            arguments["label"] = label
            return rng.choice(ALARM_LABELED[split]).format(label=label, **fill), "set_alarm", arguments
        return rng.choice(ALARM[split]).format(**fill), "set_alarm", arguments
    if kind == "weather":
        city = rng.choice(CITIES[split])
        if rng.random() < 0.3:
            unit = rng.choice(["celsius", "fahrenheit"])
            return rng.choice(WEATHER_UNIT[split]).format(city=city, unit=unit), "get_weather", \
                {"city": city, "unit": unit}
        return rng.choice(WEATHER[split]).format(city=city), "get_weather", {"city": city}
    amount = rng.choice([5, 12, 20, 50, 75, 100, 250, 300, 1000, 19.5, 42.75])
    src, dst = rng.sample(CURRENCIES, 2)
    return rng.choice(CURRENCY[split]).format(amount=amount, src=src, dst=dst), "convert_currency", \
        {"amount": amount, "from_currency": src, "to_currency": dst}


RESULTS = {  # a plausible tool result and the answer that reads it, for the longer training lines
    "set_alarm": (lambda a: {"status": "set", "time": f"{a['hour']:02d}:{a['minute']:02d}"},
                  lambda a, r: f"Your alarm is set for {r['time']}."),
    "get_weather": (lambda a: {"city": a["city"], "temperature": 18, "unit": a.get("unit", "celsius"),
                               "sky": "cloudy"},
                    lambda a, r: f"It is {r['temperature']} degrees {r['unit']} and {r['sky']} in {r['city']}."),
    "convert_currency": (lambda a: {"result": round(a["amount"] * 1.1, 2), "currency": a["to_currency"]},
                         lambda a, r: f"{a['amount']} {a['from_currency']} is {r['result']} {r['currency']}."),
}


def line(rng: random.Random, split: int, index: int, with_result: bool) -> dict:
    if rng.random() < NO_CALL_SHARE[split]:
        request, answer = rng.choice(NO_CALL[split])
        return {"tools": TOOLS, "messages": [{"role": "user", "content": request},
                                             {"role": "assistant", "content": answer}]}
    request, name, arguments = call_line(rng, split)
    call_id = f"call_{index}"
    messages = [{"role": "user", "content": request},
                {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": name, "arguments": json.dumps(arguments)}}]}]
    if with_result:
        make_result, make_answer = RESULTS[name]
        result = make_result(arguments)
        messages += [{"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
                     {"role": "assistant", "content": make_answer(arguments, result)}]
    return {"tools": TOOLS, "messages": messages}


def build() -> None:
    # One generator per split: the test rows stay the same when the training phrasings change.
    rng = random.Random(SEED)
    train = [line(rng, 0, i, with_result=rng.random() < 0.25) for i in range(N_TRAIN)]
    rng = random.Random(SEED + 1)
    test = [line(rng, 1, i, with_result=False) for i in range(N_TEST)]  # the call (or answer) is what is scored
    for name, rows in (("train", train), ("test", test)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{HERE / name}.jsonl: {len(rows)} lines")


if __name__ == "__main__":
    build()
