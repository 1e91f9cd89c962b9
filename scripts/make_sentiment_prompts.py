"""Write the sentiment prompt set: openings of everyday opinions that stop just before the
opinion ("Frankly, the service at the hotel was").

  python scripts/make_sentiment_prompts.py            # rewrites bond_jax/data/prompt_sets/

Each prompt is a frame (how a reviewer starts a sentence) around a subject (what is being
reviewed), both written for this project. The training and held-out files use disjoint
subjects, so held-out prompts are about things the policy never saw during training.
Prompts are neutral by construction: no frame or subject carries sentiment, and with
vaderSentiment installed (requirements-real.txt) every prompt is checked to score
exactly 0 alone. The output is a pure function of the lists below and SEED;
tests/data/test_prompt_sets.py checks the committed files against it.
"""

import json
import pathlib
import random
import sys

OUT = pathlib.Path(__file__).resolve().parents[1] / 'bond_jax' / 'data' / 'prompt_sets'
SEED = 20261207
NUM_TRAIN, NUM_HELDOUT = 1000, 200

FRAMES = (
  'Frankly, {s} was',
  'I have to say that {s} was',
  'To be frank, {s} turned out to be',
  'My take on {s} is that it was',
  'Looking back on it, I think {s} was',
  'Compared with last time, {s} was',
  'If you ask me, {s} felt',
  'The first thing I noticed about {s} was that it was',
  'After a week of thinking about it, I would say {s} was',
  'In a word, {s} was',
  'When people ask me about {s}, I tell them it was',
  'My sister asked how {s} was, and I said it was',
  'Without going into too much detail, {s} was',
  'For what it cost, {s} was',
  'I went in not knowing much, and {s} was',
  'Two days later, I still think {s} was',
  'If you are wondering about {s}, it was',
  'On the whole, {s} was',
  'I will keep this short: {s} was',
  'Before you book anything, know that {s} was',
  'We talked about it on the way home, and {s} was',
  'I wrote this review because {s} was',
  'The part I keep coming back to is that {s} was',
  'Overall, I found {s} to be',
  'From the moment we arrived, {s} seemed',
  'As someone who goes there often, I think {s} was',
  'Let me put it this way: {s} was',
  'My neighbour told me about it, and {s} was',
)

# Disjoint subject lists: the held-out prompts review things absent from training.
TRAIN_SUBJECTS = (
  'the service at the hotel',
  'the breakfast at the hotel',
  'the room we stayed in',
  'the check-in at the front desk',
  'the second half of the film',
  'the ending of the movie',
  'the soundtrack of the film',
  'the lead actor in the film',
  'the new phone',
  'the battery life of the phone',
  'the camera on the new phone',
  'the laptop I bought last month',
  'the keyboard on the laptop',
  'the pasta at the restaurant',
  'the dessert menu',
  'the waiter at our table',
  'the coffee at the corner café',
  'the bakery down the street',
  'the flight to Lisbon',
  'the legroom on the plane',
  'the train ride to the coast',
  'the bus service in town',
  'the museum on the hill',
  'the guided tour of the castle',
  'the concert on Saturday night',
  'the opening act',
  'the new album',
  'the podcast episode',
  'the paperback I read last week',
  'the last chapter of the book',
  'the cooking class',
  'the yoga class at the gym',
  'the gym near my office',
  'the online course',
  'the math homework app',
  'the video game',
  'the story mode of the game',
  'the TV series',
  'the final season of the show',
  'the headphones',
  'the robot vacuum',
  'the coffee machine',
  'the rental car',
  'the bike shop repair',
  'the dentist appointment',
  'the haircut',
  'the apartment viewing',
  'the wedding venue',
  'the birthday dinner',
  'the farmers market',
)
HELDOUT_SUBJECTS = (
  'the spa at the resort',
  'the pizza place on Main Street',
  'the documentary about whales',
  'the smartwatch',
  'the ferry to the island',
  'the art exhibition',
  'the jazz night',
  'the board game we tried',
  'the language app',
  'the new sofa',
  'the camping trip',
  'the theatre show',
)


def prompts(subjects: tuple[str, ...]) -> list[str]:
  texts = [frame.format(s=subject) for subject in subjects for frame in FRAMES]
  return [t[0].upper() + t[1:] for t in texts]


def make() -> tuple[list[str], list[str]]:
  """(training, held-out) prompt texts."""
  rng = random.Random(SEED)
  train = rng.sample(prompts(TRAIN_SUBJECTS), NUM_TRAIN)
  heldout = rng.sample(prompts(HELDOUT_SUBJECTS), NUM_HELDOUT)
  return train, heldout


def vader_scores(texts: list[str]) -> list[float] | None:
  """VADER's compound score of each text alone, or None when vaderSentiment is absent."""
  try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
  except ImportError:
    return None
  analyzer = SentimentIntensityAnalyzer()
  return [analyzer.polarity_scores(t)['compound'] for t in texts]


def write(out: pathlib.Path = OUT) -> None:
  train, heldout = make()
  scores = vader_scores(train + heldout)
  if scores is None:
    print('vaderSentiment is not installed: prompts not checked for neutrality', file=sys.stderr)
  elif any(scores):
    bad = [t for t, s in zip(train + heldout, scores, strict=True) if s][:3]
    sys.exit(f'error: prompts with sentiment of their own: {bad}')
  out.mkdir(parents=True, exist_ok=True)
  for name, texts in (('sentiment_train', train), ('sentiment_heldout', heldout)):
    lines = ''.join(json.dumps({'prompt': t}) + '\n' for t in texts)
    (out / f'{name}.jsonl').write_text(lines)
    print(f'wrote {len(texts)} prompts to {out / name}.jsonl')


if __name__ == '__main__':
  write()
