# Writes two real data sets bundled with scikit-learn (digits: 8x8 images, 10 classes;
# diabetes: 10 features, one real target) as --data-npy folders under the current
# directory, and prints the diabetes baselines. Needs numpy and scikit-learn (not the tests).
import numpy as np, os
from sklearn.datasets import load_digits, load_diabetes
rng = np.random.default_rng(0)
d = load_digits()
x = (d.images / 16.0).astype(np.float32)[:, None, :, :]   # N x 1 x 8 x 8 in [0, 1]
y = d.target.astype(np.int64)
p = rng.permutation(len(y)); x, y = x[p], y[p]
os.makedirs("digits", exist_ok=True)
np.save("digits/train_x.npy", x[:1437]); np.save("digits/train_y.npy", y[:1437])
np.save("digits/test_x.npy", x[1437:]); np.save("digits/test_y.npy", y[1437:])
b = load_diabetes()   # 442 x 10, already standardised features; target 25..346
x = b.data.astype(np.float32); t = b.target.astype(np.float64)
p = rng.permutation(len(t)); x, t = x[p], t[p]
ntr = 352
mu, sd = t[:ntr].mean(), t[:ntr].std()
t = ((t - mu) / sd).astype(np.float32)[:, None]             # standardised on the training split
x = (x / x[:ntr].std(axis=0)).astype(np.float32)
os.makedirs("diabetes", exist_ok=True)
np.save("diabetes/train_x.npy", x[:ntr]); np.save("diabetes/train_y.npy", t[:ntr])
np.save("diabetes/test_x.npy", x[ntr:]); np.save("diabetes/test_y.npy", t[ntr:])
# Baselines on the test split (standardised units).
te = t[ntr:, 0].astype(np.float64)
print("diabetes test MSE of the training mean:", float(np.mean((te - t[:ntr].mean())**2)))
A = np.hstack([x[:ntr], np.ones((ntr, 1), np.float32)]).astype(np.float64)
w, *_ = np.linalg.lstsq(A, t[:ntr, 0].astype(np.float64), rcond=None)
At = np.hstack([x[ntr:], np.ones((len(te), 1))])
print("diabetes test MSE of least squares (linear + bias):", float(np.mean((At @ w - te)**2)))
