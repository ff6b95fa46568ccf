from kvblend.model.rope import *  # noqa  TEMP shim until the restructuring lands
from kvblend.model.rope import inv_freq, rope_shift  # noqa
