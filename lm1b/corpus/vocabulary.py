"""The embedded corpus's words: topics with their agents, things and places, verbs with their
forms, adjectives, adverbs, names, numbers and years (about 1,200 types).

Nouns are listed singular, verbs by their base form (irregular ones as "base/third/past", the
third person singular present in the middle); the tables below hold the derived forms. The order
of every list is part of the corpus: the grammar draws indices into them, and earlier nouns and
verbs are drawn more often.
"""

_TOPIC_WORDS = {  # topic: (agent nouns, thing nouns, places)
  "farm": (
    "farmer shepherd goat horse cow dog farmhand neighbour groom beekeeper rooster",
    "barn fence bucket tractor cart basket apple potato bale sack plough egg ladder",
    "field orchard meadow stable hill"),
  "harbour": (
    "sailor captain fisherman diver pilot dockworker gull smuggler merchant ferryman",
    "boat net anchor rope crate barrel lantern sail compass oar cargo hull",
    "harbour pier island lighthouse bay"),
  "lab": (
    "scientist chemist student engineer technician professor mouse rat volunteer inspector",
    "sample microscope flask machine report battery crystal sensor magnet engine formula",
    "laboratory basement workshop clinic tower"),
  "market": (
    "baker butcher customer trader seller tourist thief guard tailor cook",
    "loaf coin cheese melon scarf jar knife tomato candle carpet spice",
    "market square shop street bakery"),
  "school": (
    "teacher child pupil librarian principal poet painter musician actor coach",
    "book letter pencil desk map poem song painting drum chair notebook",
    "school library classroom theatre garden"),
  "city": (
    "mayor driver officer banker lawyer reporter nurse doctor clerk cyclist soldier",
    "bus train car bridge ticket newspaper bicycle clock umbrella statue lamp",
    "city station museum office hospital"),
  "forest": (
    "hunter ranger wolf fox bear owl stag traveller woodcutter hermit",
    "axe tree log cabin fire path stone branch leaf mushroom map",
    "forest valley river cave mountain"),
  "kingdom": (
    "king queen knight prince princess servant guard minister wizard messenger",
    "sword crown castle letter horse shield treasure throne banner key ring",
    "castle palace court village kingdom"),
}

_IRREGULAR_PLURALS = {
  "child": "children", "mouse": "mice", "knife": "knives", "leaf": "leaves", "wolf": "wolves",
  "potato": "potatoes", "tomato": "tomatoes", "cargo": "cargoes", "thief": "thieves",
  "loaf": "loaves",
}

ADJECTIVES = (
  "old young small large tall short heavy light quiet loud busy lazy clever angry happy tired "
  "hungry careful nervous proud brave honest strange famous silent bright dark cold warm wet dry "
  "broken new ancient modern simple expensive cheap rare common empty full clean dirty green red "
  "blue yellow white black wooden golden distant nearby secret public local foreign ordinary "
  "curious gentle fierce patient polite rude slow fast rich poor sick healthy lucky calm").split()

PREDICATE_ADJECTIVES = (  # fit people and things: "the 12 boxes were missing"
  "ready late early missing safe lost gone hidden famous fine quiet wet dry clean dirty cold warm "
  "busy alone new old different important visible expected unusual").split()

ADVERBS = (
  "quickly slowly quietly loudly carefully suddenly finally again often rarely yesterday today "
  "early late together alone happily angrily patiently eagerly badly well twice secretly "
  "gladly openly").split()

_INTRANSITIVE_WORDS = (
  "arrive wait laugh complain travel return disappear vote hesitate shout work rest agree "
  "celebrate smile cry dance listen pray argue knock whisper wander recover retire improve fail "
  "succeed sleep/sleeps/slept leave/leaves/left run/runs/ran sing/sings/sang speak/speaks/spoke "
  "stop/stops/stopped swim/swims/swam fall/falls/fell win/wins/won lie/lies/lay sit/sits/sat "
  "stay/stays/stayed").split()

_TRANSITIVE_WORDS = (
  "carry repair paint count move open inspect describe order deliver clean borrow load collect "
  "protect follow watch visit notice measure examine destroy prepare polish guard sign return "
  "wash push pull see/sees/saw build/builds/built sell/sells/sold buy/buys/bought "
  "find/finds/found hide/hides/hid lose/loses/lost hold/holds/held bring/brings/brought "
  "make/makes/made take/takes/took keep/keeps/kept feed/feeds/fed meet/meets/met "
  "catch/catches/caught steal/steals/stole break/breaks/broke choose/chooses/chose "
  "drop/drops/dropped forget/forgets/forgot throw/throws/threw write/writes/wrote "
  "draw/draws/drew bury/buries/buried").split()

_SPEECH_WORDS = (
  "claim announce suspect explain insist report believe argue remember say/says/said "
  "think/thinks/thought feel/feels/felt admit/admits/admitted know/knows/knew hear/hears/heard "
  "write/writes/wrote").split()

FEMALE_NAMES = (
  "Maria Anna Elena Sofia Laura Clara Irene Nadia Olga Rosa Julia Alice Hannah Greta Ines "
  "Yara Leila Mira Tessa Vera Ada Beatrice Carmen Dora Eva Fiona Gloria Helen Ivy Joan").split()
MALE_NAMES = (
  "Peter Omar Ivan Carlos Lucas Felix Tomas Hugo Samuel Victor Daniel Marco Anton Bruno Emil "
  "Karl Leon Max Nikolai Oscar Paul Rafael Simon Theo Walter Yusuf Arthur Boris Dmitri George"
  ).split()
SURNAMES = (
  "Lopez Novak Berger Okafor Tanaka Silva Kowalski Haddad Moreau Jensen Rossi Petrov Costa Ibrahim "
  "Fischer Dubois Andersen Kim Nakamura Oliveira Schmidt Ferreira Meyer Larsen Romano Volkov Reyes "
  "Mendes Wagner Bauer Conti Lindqvist Nowak Sato Alvarez Demir Karim Marsh Holt Quinn Abbott "
  "Barros Castillo Duarte Eriksen Ford Grant Hale Ito Joshi Keller Lund Mori Nash Ortiz Pike "
  "Rhodes Stone Torres Ueda Vance Weiss Young Zeller").split()

PREPOSITIONS = "near behind beside under above inside outside across from beyond".split()
SUBORDINATORS = "because while although when after before if".split()
TAILS = (", and", ", but", ", so", ", while", ", and then", "; meanwhile ,")


def plural(noun: str) -> str:
  """The plural of a singular noun of this vocabulary."""
  if noun in _IRREGULAR_PLURALS:
    return _IRREGULAR_PLURALS[noun]
  if noun.endswith(("s", "x", "z", "ch", "sh")):
    return noun + "es"
  if noun.endswith("y") and noun[-2] not in "aeiou":
    return noun[:-1] + "ies"
  return noun + "s"


def verb_forms(verb: str) -> tuple[str, str, str]:
  """(base, third person singular present, past) of a regular base form, or of an irregular
  verb written "base/third/past"."""
  if "/" in verb:
    base, third, past = verb.split("/")
    return base, third, past
  if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
    third = verb + "es"
  elif verb.endswith("y") and verb[-2] not in "aeiou":
    third = verb[:-1] + "ies"
  else:
    third = verb + "s"
  if verb.endswith("e"):
    past = verb + "d"
  elif verb.endswith("y") and verb[-2] not in "aeiou":
    past = verb[:-1] + "ied"
  else:
    past = verb + "ed"
  return verb, third, past


def article(word: str) -> str:
  """The indefinite article before `word`: "a" or "an"."""
  return "an" if word[0] in "aeio" or word.startswith(("u", "hour", "honest")) else "a"


def _nouns(words: str) -> tuple[list[str], list[str]]:
  singular = words.split()
  return singular, [plural(w) for w in singular]


TOPICS = tuple(_TOPIC_WORDS)  # topic names; a topic is drawn as an index into this
# Per topic (indexed like TOPICS): (singular nouns, plural nouns) of agents and of things, places.
AGENTS = [_nouns(t[0]) for t in _TOPIC_WORDS.values()]
THINGS = [_nouns(t[1]) for t in _TOPIC_WORDS.values()]
PLACES = [t[2].split() for t in _TOPIC_WORDS.values()]
# (singular nouns, plural nouns) of every topic together.
ALL_AGENTS = (sum((a[0] for a in AGENTS), []), sum((a[1] for a in AGENTS), []))
ALL_THINGS = (sum((t[0] for t in THINGS), []), sum((t[1] for t in THINGS), []))
# Verbs as (base, third person singular, past).
INTRANSITIVE_VERBS = [verb_forms(v) for v in _INTRANSITIVE_WORDS]
TRANSITIVE_VERBS = [verb_forms(v) for v in _TRANSITIVE_WORDS]
SPEECH_VERBS = [verb_forms(v) for v in _SPEECH_WORDS]
NUMBERS = [str(n) for n in range(2, 100)]
YEARS = [str(y) for y in range(1950, 2020)]
