"""faster: Feature Aggregation for Spatio-TEmporal Redundancy (Zhu et al., AAAI 2020).

Importing the package has no side effects: heavy libraries (torch, h5py, decord) are imported
by the modules that need them.
"""

__version__ = "0.1.0"
