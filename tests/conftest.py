import sys
from pathlib import Path

# Let tests import the helper modules beside them (tiny.py, hf_fixtures.py).
sys.path.insert(0, str(Path(__file__).parent))
