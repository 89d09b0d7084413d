"""Interop with the official readers: numpy and the safetensors package load our
checkpoints, optimizer states and statistics and see the values our readers see;
our readers load files those libraries wrote (dtypes, 0-d and empty tensors,
header padding, .npy format 2.0), and refuse Fortran order and big-endian data.

Run by ctest with UNIV_BIN (the programs' folder) and UNIV_INTEROP_CHECK set."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

try:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
except ImportError as error:  # scripts/install_deps.sh installs both
    print(f"skipped: numpy and safetensors are needed ({error})")
    sys.exit(77)

BIN = os.environ["UNIV_BIN"]


def ours(command, path):
    out = subprocess.run([os.environ["UNIV_INTEROP_CHECK"], command, path], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def program(name, *args):
    return subprocess.run([os.path.join(BIN, name), *map(str, args)], check=True, capture_output=True, text=True)


class OurFilesInTheirReaders(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.run_dir = os.path.join(cls.dir.name, "run")
        program("train_pair", "--out", cls.run_dir, "--seq-len", 8, "--d-model", 16, "--heads", 2, "--d-mlp", 24,
                "--layers", 2, "--samples", 128, "--batch", 16, "--steps", 12, "--test-samples", 100,
                "--device", "cpu")
        cls.stats = os.path.join(cls.dir.name, "run.stats")
        program("correlate", cls.run_dir, "--out", os.path.join(cls.dir.name, "report"), "--save-stats", cls.stats)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def assert_same_tensors(self, path):
        theirs = load_file(path)
        mine = ours("tensors", path)
        self.assertEqual(set(theirs), set(mine["tensors"]))
        for name, array in theirs.items():
            entry = mine["tensors"][name]
            self.assertEqual(list(array.shape), entry["shape"], name)
            expected = np.asarray(entry["values"], dtype=array.dtype).reshape(array.shape)
            np.testing.assert_array_equal(array, expected, err_msg=name)
        with safe_open(path, "np") as f:
            self.assertEqual(f.metadata(), mine["metadata"])
        return theirs, mine["metadata"]

    def test_checkpoints(self):
        for m in (0, 1):
            weights, meta = self.assert_same_tensors(os.path.join(self.run_dir, f"model_{m}.safetensors"))
            config = json.loads(meta["univ.model"])
            self.assertEqual(meta["format"], "univ.checkpoint.v1")
            self.assertEqual(int(meta["univ.step"]), 12)
            self.assertEqual(int(meta["univ.seed"]), m)
            self.assertEqual(weights["wte"].shape, (config["vocab"], config["d_model"]))
            self.assertEqual(weights["blocks.1.mlp.fc.weight"].shape, (config["d_mlp"], config["d_model"]))
            self.assertTrue(all(np.isfinite(a).all() for a in weights.values()))
            moments, _ = self.assert_same_tensors(os.path.join(self.run_dir, f"optim_{m}.safetensors"))
            self.assertTrue((moments["exp_avg_sq.wte"] >= 0).all())

    def test_statistics(self):
        stats, meta = self.assert_same_tensors(self.stats)
        self.assertEqual(meta["format"], "univ.stats.v1")
        self.assertEqual(stats["count"].tolist(), [800])
        self.assertEqual(stats["cross.0.1"].shape, (48, 48))
        self.assertEqual(stats["cross.0.1"].dtype, np.float64)
        # Within-layer co-moments are symmetric with non-negative diagonals.
        w = stats["within.1.0"]
        np.testing.assert_allclose(w, w.T, rtol=1e-12, atol=1e-12)
        self.assertTrue((np.diag(w) >= 0).all())


class TheirFilesInOurReaders(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.dir.cleanup()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def test_token_arrays_of_every_integer_dtype_and_shape(self):
        rng = np.random.default_rng(0)
        for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
            for shape in ((37,), (5, 7), (0,), ()):
                info = np.iinfo(dtype)
                array = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, dtype=dtype)
                np.save(self.path("t.npy"), array)
                mine = ours("tokens", self.path("t.npy"))
                self.assertEqual(mine["tokens"], array.reshape(-1).tolist(), (dtype, shape))

    def test_format_version_2_headers(self):
        array = np.arange(10, dtype=np.int32)
        with open(self.path("v2.npy"), "wb") as f:
            np.lib.format.write_array(f, array, version=(2, 0))
        self.assertEqual(ours("tokens", self.path("v2.npy"))["tokens"], list(range(10)))

    def test_float_matrices(self):
        rng = np.random.default_rng(1)
        for dtype in (np.float32, np.float16):
            array = rng.standard_normal((13, 6)).astype(dtype)
            np.save(self.path("m.npy"), array)
            mine = ours("matrix", self.path("m.npy"))
            self.assertEqual((mine["rows"], mine["cols"]), (13, 6))
            np.testing.assert_array_equal(np.asarray(mine["values"], np.float32).reshape(13, 6),
                                          array.astype(np.float32))

    def test_refused_layouts(self):
        fortran = np.asfortranarray(np.ones((4, 3), np.float32))
        np.save(self.path("f.npy"), fortran)
        self.assertIn("Fortran-ordered", ours("matrix", self.path("f.npy"))["error"])
        np.save(self.path("fi.npy"), np.asfortranarray(np.ones((4, 3), np.int32)))
        self.assertIn("Fortran-ordered", ours("tokens", self.path("fi.npy"))["error"])
        np.save(self.path("be.npy"), np.ones(4, dtype=">i4"))
        self.assertIn("big-endian", ours("tokens", self.path("be.npy"))["error"])
        np.save(self.path("f64.npy"), np.ones((2, 2), np.float64))
        self.assertIn("must be float32, float16 or bfloat16", ours("matrix", self.path("f64.npy"))["error"])

    def test_safetensors_edge_cases(self):
        rng = np.random.default_rng(2)
        tensors = {
            "scalar": np.array(3.5, dtype=np.float32),
            "empty": np.zeros((0, 4), dtype=np.float32),
            "half": rng.standard_normal((3, 5)).astype(np.float16),
            "double": rng.standard_normal(7),
            "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
            "odd": np.arange(3, dtype=np.int32),  # 12 bytes: the next tensor's offset is not 8-aligned
        }
        save_file(tensors, self.path("t.safetensors"), metadata={"note": "from python"})
        mine = ours("tensors", self.path("t.safetensors"))
        self.assertEqual(mine["metadata"], {"note": "from python"})
        for name, array in tensors.items():
            entry = mine["tensors"][name]
            self.assertEqual(entry["shape"], list(array.shape), name)
            np.testing.assert_array_equal(np.asarray(entry["values"], array.dtype).reshape(array.shape), array,
                                          err_msg=name)
        single = rng.standard_normal((9, 4)).astype(np.float16)
        save_file({"acts": single}, self.path("acts.safetensors"))
        mine = ours("matrix", self.path("acts.safetensors"))
        np.testing.assert_array_equal(np.asarray(mine["values"], np.float32).reshape(9, 4), single.astype(np.float32))


if __name__ == "__main__":
    unittest.main()
