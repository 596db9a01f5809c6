//! `--pairing authors`: the authors' driver pairs, on the first of the r iterations of a
//! new mini-batch, the outputs of the previous batch's images with the new batch's
//! labels. Checked against a hand-made update from the same ensemble.

mod common;
use common::limited;

use enkf_dnn::backend::{Backend, BackendKind};
use enkf_dnn::cpu::CpuBackend;
use enkf_dnn::enkf::{one_hot, EnkfWorkspace, UpdateRule};
use enkf_dnn::model::CLASSES;
use enkf_dnn::train::{LabelPairing, PartialConfig, Trainer};

const J: usize = 12;
const B: usize = 8;

fn ensemble_after(pairing: LabelPairing, iterations: usize) -> Vec<f32> {
    let data = limited(4 * B, 16);
    let cfg = PartialConfig {
        members: Some(J),
        batch: Some(B),
        repetitions: Some(2),
        iterations: Some(iterations),
        eval_every: Some(1000),
        pairing: Some(pairing),
        backend: Some(BackendKind::Cpu),
        threads: Some(1),
        ..Default::default()
    }
    .resolve()
    .expect("config");
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, &cfg, &data).expect("trainer");
    t.run(&mut ()).expect("run");
    t.ensemble_host().expect("ensemble")
}

#[test]
fn authors_pairing_uses_the_previous_batch_once_per_batch() {
    // Batch 0 (iterations 1, 2): no previous batch, the two modes agree bit for bit.
    let u2 = ensemble_after(LabelPairing::Matched, 2);
    assert_eq!(ensemble_after(LabelPairing::Authors, 2), u2);

    // Iteration 3, the first on batch 1: batch 0's images with batch 1's labels.
    let data = limited(4 * B, 16);
    let be = CpuBackend::new();
    let net = enkf_dnn::model::Net::default();
    let p = net.n_params();
    let mut x0 = Vec::new();
    data.train.gather(&(0..B).collect::<Vec<_>>(), &mut x0);
    let mut x1 = Vec::new();
    let y1 = data.train.gather(&(B..2 * B).collect::<Vec<_>>(), &mut x1);
    let gamma = 0.01;
    let update_from = |x: &Vec<f32>| {
        let mut u = u2.clone();
        let mut g = vec![0.0f32; J * B * CLASSES];
        be.ensemble_forward(&net, &u, J, x, B, &mut g)
            .expect("forward");
        let mut ws = EnkfWorkspace::new(&be, J, p, B).expect("workspace");
        let y = one_hot(&y1, CLASSES);
        ws.update(&be, UpdateRule::Sequential, gamma, &mut u, &g, &y)
            .expect("update");
        u
    };
    let authors = ensemble_after(LabelPairing::Authors, 3);
    assert_eq!(
        authors,
        update_from(&x0),
        "authors: batch 0's outputs, batch 1's labels"
    );
    let matched = ensemble_after(LabelPairing::Matched, 3);
    assert_eq!(matched, update_from(&x1), "matched: batch 1's own outputs");
    assert_ne!(authors, matched);
}
