//! Charts: files are written, the PNG decodes at the documented size with drawn
//! content, and the SVG carries the title and legend text.

use enkf_dnn::plot::{
    histogram_chart, line_chart, HistPanel, HistSeries, Series, HIST_PANEL_SIZE, LINE_SIZE,
};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("enkf-plot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// (width, height, RGB(A) bytes, channels) of a PNG.
fn decode(path: &Path) -> (u32, u32, Vec<u8>, usize) {
    let f = std::fs::File::open(path).expect("png exists");
    let mut r = png::Decoder::new(std::io::BufReader::new(f))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("png data");
    let ch = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf, ch)
}

/// Number of pixels with the given RGB value.
fn count(buf: &[u8], ch: usize, rgb: [u8; 3]) -> usize {
    buf.chunks_exact(ch).filter(|p| p[..3] == rgb).count()
}

#[test]
fn line_chart_writes_png_and_svg_with_band_and_legend() {
    let dir = tmp("line");
    let x: Vec<f64> = (0..20).map(|i| i as f64 * 50.0).collect();
    let s = vec![
        Series {
            label: "EnKF (J = 50)".into(),
            x: x.clone(),
            y: x.iter().map(|v| 90.0 - v / 20.0).collect(),
            band: Some(vec![3.0; 20]),
        },
        Series {
            label: "SGD".into(),
            x: x.clone(),
            y: vec![88.65; 20],
            band: None,
        },
    ];
    let stem = dir.join("sub").join("fig1");
    line_chart(
        &stem,
        "Test error, MNIST",
        "iteration",
        "test error (%)",
        &s,
        false,
    )
    .expect("chart");
    let (w, h, buf, ch) = decode(&stem.with_extension("png"));
    assert_eq!((w, h), LINE_SIZE);
    let white = count(&buf, ch, [255, 255, 255]);
    assert!(
        white < (w * h) as usize * 97 / 100,
        "chart is nearly blank: {white} white pixels"
    );
    // The first series' colour (Tableau blue 31,119,180) is drawn.
    assert!(
        count(&buf, ch, [31, 119, 180]) > 100,
        "no line pixels of series 1"
    );
    let svg = std::fs::read_to_string(stem.with_extension("svg")).expect("svg");
    for text in [
        "Test error, MNIST",
        "EnKF (J = 50)",
        "SGD",
        "test error (%)",
        "iteration",
    ] {
        assert!(svg.contains(text), "SVG lacks {text:?}");
    }
    // The band is a filled polygon at 20 % opacity.
    assert!(svg.contains("<polygon"), "no band polygon in SVG");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn log_axis_drops_non_positive_points_and_bad_lengths_are_errors() {
    let dir = tmp("log");
    let s = [Series {
        label: "loss".into(),
        x: vec![0.0, 1.0, 2.0, 3.0],
        y: vec![0.0, 1.0, 0.1, 0.01],
        band: Some(vec![0.5, 0.5, 0.05, 0.005]),
    }];
    line_chart(&dir.join("log"), "Loss", "epoch", "loss (nats)", &s, true).expect("log chart");
    assert!(dir.join("log.png").is_file() && dir.join("log.svg").is_file());
    let bad = [Series {
        label: "bad".into(),
        x: vec![0.0, 1.0],
        y: vec![1.0],
        band: None,
    }];
    let err = line_chart(&dir.join("bad"), "t", "x", "y", &bad, false).expect_err("lengths");
    assert!(err.to_string().contains("bad"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn histogram_chart_stacks_one_panel_per_layer() {
    let dir = tmp("hist");
    let edges: Vec<f64> = (0..=10).map(|i| i as f64 / 10.0).collect();
    let panels: Vec<HistPanel> = (1..=3)
        .map(|layer| HistPanel {
            title: format!("layer {layer}"),
            series: vec![
                HistSeries {
                    label: "iteration 0".into(),
                    edges: edges.clone(),
                    counts: (0..10).map(|i| (i * layer) as f64).collect(),
                },
                HistSeries {
                    label: "iteration 200".into(),
                    edges: edges.clone(),
                    counts: (0..10).map(|i| (10 - i) as f64).collect(),
                },
            ],
        })
        .collect();
    let stem = dir.join("hist");
    histogram_chart(
        &stem,
        "Activations, SGD",
        "activation",
        "fraction of values",
        &panels,
    )
    .expect("hist");
    let (w, h, buf, ch) = decode(&stem.with_extension("png"));
    assert_eq!(w, HIST_PANEL_SIZE.0);
    assert_eq!(h, 40 + 3 * HIST_PANEL_SIZE.1);
    assert!(
        count(&buf, ch, [255, 127, 14]) > 50,
        "no outline of series 2"
    );
    let svg = std::fs::read_to_string(stem.with_extension("svg")).expect("svg");
    for text in [
        "Activations, SGD",
        "layer 3",
        "iteration 200",
        "fraction of values",
    ] {
        assert!(svg.contains(text), "SVG lacks {text:?}");
    }
    let mut broken = panels.clone();
    broken[1].series[0].edges.pop();
    let err = histogram_chart(&dir.join("b"), "t", "x", "y", &broken).expect_err("edges");
    assert!(err.to_string().contains("layer 2"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Values whose axis span overflows f64 used to send plotters' tick computation into a
/// loop without end; they are an error now. Spans too narrow for f64 ticks are widened
/// and drawn.
#[test]
fn undrawable_ranges_are_errors_and_narrow_ones_are_widened() {
    let dir = tmp("extreme");
    let huge_band = vec![Series {
        label: "A".into(),
        x: vec![0.0, 1.0],
        y: vec![50.0, 40.0],
        band: Some(vec![1e308, 0.0]),
    }];
    let err = line_chart(&dir.join("huge"), "T", "x", "y", &huge_band, false)
        .expect_err("a band of 1e308");
    assert!(err.to_string().contains("1e308"), "{err}");
    let huge_x = vec![Series {
        label: "A".into(),
        x: vec![-1e308, 1e308],
        y: vec![1.0, 2.0],
        band: None,
    }];
    assert!(line_chart(&dir.join("huge-x"), "T", "x", "y", &huge_x, false).is_err());
    for (name, x) in [
        ("subnormal", vec![0.0, 5e-324]),
        ("large-equal", vec![1e20, 1e20 + 4096.0]),
    ] {
        let s = vec![Series {
            label: "A".into(),
            x,
            y: vec![1.0, 1.0 + 1e-300],
            band: None,
        }];
        line_chart(&dir.join(name), "T", "x", "y", &s, name == "subnormal").expect(name);
        assert!(dir.join(format!("{name}.png")).is_file(), "{name}");
    }
    let h = vec![HistPanel {
        title: "layer".into(),
        series: vec![HistSeries {
            label: "it 0".into(),
            edges: vec![-1e308, 0.0, 1e308],
            counts: vec![1.0, 2.0],
        }],
    }];
    assert!(histogram_chart(&dir.join("hist"), "T", "x", "y", &h).is_err());
}
