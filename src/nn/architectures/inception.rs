//! Inception-v3 without the auxiliary head, with torchvision's tensor names (`Conv2d_1a_3x3.conv`,
//! `.bn`, `Mixed_5b.branch1x1`, …). BatchNorm eps 0.001; any input of at least 75x75.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::backbone::{Arch, ArchSpec, Backbone, Normalization};
use crate::nn::layers::{Activation, ConvBn, ConvSpec};
use crate::nn::pool::{avg_pool2d, max_pool2d};

const EPS: f64 = 1e-3;

/// torchvision's BasicConv2d: conv (no bias) + BatchNorm + ReLU under `name.conv` / `name.bn`.
struct Basic(ConvBn);

impl Basic {
    fn new(vb: &VarBuilder, name: &str, spec: ConvSpec) -> Result<Self> {
        let v = vb.pp(name);
        Ok(Basic(ConvBn::new(spec.eps(EPS), v.pp("conv"), v.pp("bn"))?))
    }

    fn sq(
        vb: &VarBuilder,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Basic::new(vb, name, ConvSpec::new(cin, cout, k, stride, pad))
    }

    fn rect(
        vb: &VarBuilder,
        name: &str,
        cin: usize,
        cout: usize,
        k: (usize, usize),
        pad: (usize, usize),
    ) -> Result<Self> {
        Basic::new(vb, name, ConvSpec::rect(cin, cout, k, pad))
    }

    fn f(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_act(x, train, Activation::Relu)
    }
}

/// Runs a chain of convolutions.
fn chain(convs: &[Basic], x: &Tensor, train: bool) -> Result<Tensor> {
    convs.iter().try_fold(x.clone(), |y, c| c.f(&y, train))
}

enum Mixed {
    A {
        b1: Basic,
        b5: [Basic; 2],
        b3: [Basic; 3],
        pool: Basic,
    },
    B {
        b3: Basic,
        b3dbl: [Basic; 3],
    },
    C {
        b1: Basic,
        b7: [Basic; 3],
        b7dbl: [Basic; 5],
        pool: Basic,
    },
    D {
        b3: [Basic; 2],
        b7x3: [Basic; 4],
    },
    E {
        b1: Basic,
        b3_1: Basic,
        b3_2: [Basic; 2],
        b3dbl: [Basic; 2],
        b3dbl_3: [Basic; 2],
        pool: Basic,
    },
}

impl Mixed {
    fn a(vb: &VarBuilder, cin: usize, pool_features: usize) -> Result<Self> {
        Ok(Mixed::A {
            b1: Basic::sq(vb, "branch1x1", cin, 64, 1, 1, 0)?,
            b5: [
                Basic::sq(vb, "branch5x5_1", cin, 48, 1, 1, 0)?,
                Basic::sq(vb, "branch5x5_2", 48, 64, 5, 1, 2)?,
            ],
            b3: [
                Basic::sq(vb, "branch3x3dbl_1", cin, 64, 1, 1, 0)?,
                Basic::sq(vb, "branch3x3dbl_2", 64, 96, 3, 1, 1)?,
                Basic::sq(vb, "branch3x3dbl_3", 96, 96, 3, 1, 1)?,
            ],
            pool: Basic::sq(vb, "branch_pool", cin, pool_features, 1, 1, 0)?,
        })
    }

    fn b(vb: &VarBuilder, cin: usize) -> Result<Self> {
        Ok(Mixed::B {
            b3: Basic::sq(vb, "branch3x3", cin, 384, 3, 2, 0)?,
            b3dbl: [
                Basic::sq(vb, "branch3x3dbl_1", cin, 64, 1, 1, 0)?,
                Basic::sq(vb, "branch3x3dbl_2", 64, 96, 3, 1, 1)?,
                Basic::sq(vb, "branch3x3dbl_3", 96, 96, 3, 2, 0)?,
            ],
        })
    }

    fn c(vb: &VarBuilder, cin: usize, c7: usize) -> Result<Self> {
        let (h, w) = ((1, 7), (7, 1));
        let (ph, pw) = ((0, 3), (3, 0));
        Ok(Mixed::C {
            b1: Basic::sq(vb, "branch1x1", cin, 192, 1, 1, 0)?,
            b7: [
                Basic::sq(vb, "branch7x7_1", cin, c7, 1, 1, 0)?,
                Basic::rect(vb, "branch7x7_2", c7, c7, h, ph)?,
                Basic::rect(vb, "branch7x7_3", c7, 192, w, pw)?,
            ],
            b7dbl: [
                Basic::sq(vb, "branch7x7dbl_1", cin, c7, 1, 1, 0)?,
                Basic::rect(vb, "branch7x7dbl_2", c7, c7, w, pw)?,
                Basic::rect(vb, "branch7x7dbl_3", c7, c7, h, ph)?,
                Basic::rect(vb, "branch7x7dbl_4", c7, c7, w, pw)?,
                Basic::rect(vb, "branch7x7dbl_5", c7, 192, h, ph)?,
            ],
            pool: Basic::sq(vb, "branch_pool", cin, 192, 1, 1, 0)?,
        })
    }

    fn d(vb: &VarBuilder, cin: usize) -> Result<Self> {
        Ok(Mixed::D {
            b3: [
                Basic::sq(vb, "branch3x3_1", cin, 192, 1, 1, 0)?,
                Basic::sq(vb, "branch3x3_2", 192, 320, 3, 2, 0)?,
            ],
            b7x3: [
                Basic::sq(vb, "branch7x7x3_1", cin, 192, 1, 1, 0)?,
                Basic::rect(vb, "branch7x7x3_2", 192, 192, (1, 7), (0, 3))?,
                Basic::rect(vb, "branch7x7x3_3", 192, 192, (7, 1), (3, 0))?,
                Basic::sq(vb, "branch7x7x3_4", 192, 192, 3, 2, 0)?,
            ],
        })
    }

    fn e(vb: &VarBuilder, cin: usize) -> Result<Self> {
        Ok(Mixed::E {
            b1: Basic::sq(vb, "branch1x1", cin, 320, 1, 1, 0)?,
            b3_1: Basic::sq(vb, "branch3x3_1", cin, 384, 1, 1, 0)?,
            b3_2: [
                Basic::rect(vb, "branch3x3_2a", 384, 384, (1, 3), (0, 1))?,
                Basic::rect(vb, "branch3x3_2b", 384, 384, (3, 1), (1, 0))?,
            ],
            b3dbl: [
                Basic::sq(vb, "branch3x3dbl_1", cin, 448, 1, 1, 0)?,
                Basic::sq(vb, "branch3x3dbl_2", 448, 384, 3, 1, 1)?,
            ],
            b3dbl_3: [
                Basic::rect(vb, "branch3x3dbl_3a", 384, 384, (1, 3), (0, 1))?,
                Basic::rect(vb, "branch3x3dbl_3b", 384, 384, (3, 1), (1, 0))?,
            ],
            pool: Basic::sq(vb, "branch_pool", cin, 192, 1, 1, 0)?,
        })
    }

    fn forward_t(&self, x: &Tensor, t: bool) -> Result<Tensor> {
        let parts = match self {
            Mixed::A { b1, b5, b3, pool } => vec![
                b1.f(x, t)?,
                chain(b5, x, t)?,
                chain(b3, x, t)?,
                pool.f(&avg_pool2d(x, 3, 1, 1)?, t)?,
            ],
            Mixed::B { b3, b3dbl } => {
                vec![b3.f(x, t)?, chain(b3dbl, x, t)?, max_pool2d(x, 3, 2, 0)?]
            }
            Mixed::C {
                b1,
                b7,
                b7dbl,
                pool,
            } => vec![
                b1.f(x, t)?,
                chain(b7, x, t)?,
                chain(b7dbl, x, t)?,
                pool.f(&avg_pool2d(x, 3, 1, 1)?, t)?,
            ],
            Mixed::D { b3, b7x3 } => vec![
                chain(b3, x, t)?,
                chain(b7x3, x, t)?,
                max_pool2d(x, 3, 2, 0)?,
            ],
            Mixed::E {
                b1,
                b3_1,
                b3_2,
                b3dbl,
                b3dbl_3,
                pool,
            } => {
                let y3 = b3_1.f(x, t)?;
                let yd = chain(b3dbl, x, t)?;
                vec![
                    b1.f(x, t)?,
                    Tensor::cat(&[b3_2[0].f(&y3, t)?, b3_2[1].f(&y3, t)?], 1)?,
                    Tensor::cat(&[b3dbl_3[0].f(&yd, t)?, b3dbl_3[1].f(&yd, t)?], 1)?,
                    pool.f(&avg_pool2d(x, 3, 1, 1)?, t)?,
                ]
            }
        };
        Tensor::cat(&parts, 1)
    }
}

pub struct InceptionV3 {
    conv1a: Basic,
    stem: [Basic; 4],
    mixed: Vec<Mixed>,
}

impl InceptionV3 {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let v = &vb;
        let mixed = vec![
            Mixed::a(&vb.pp("Mixed_5b"), 192, 32)?,
            Mixed::a(&vb.pp("Mixed_5c"), 256, 64)?,
            Mixed::a(&vb.pp("Mixed_5d"), 288, 64)?,
            Mixed::b(&vb.pp("Mixed_6a"), 288)?,
            Mixed::c(&vb.pp("Mixed_6b"), 768, 128)?,
            Mixed::c(&vb.pp("Mixed_6c"), 768, 160)?,
            Mixed::c(&vb.pp("Mixed_6d"), 768, 160)?,
            Mixed::c(&vb.pp("Mixed_6e"), 768, 192)?,
            Mixed::d(&vb.pp("Mixed_7a"), 768)?,
            Mixed::e(&vb.pp("Mixed_7b"), 1280)?,
            Mixed::e(&vb.pp("Mixed_7c"), 2048)?,
        ];
        Ok(InceptionV3 {
            conv1a: Basic::sq(v, "Conv2d_1a_3x3", 3, 32, 3, 2, 0)?,
            stem: [
                Basic::sq(v, "Conv2d_2a_3x3", 32, 32, 3, 1, 0)?,
                Basic::sq(v, "Conv2d_2b_3x3", 32, 64, 3, 1, 1)?,
                Basic::sq(v, "Conv2d_3b_1x1", 64, 80, 1, 1, 0)?,
                Basic::sq(v, "Conv2d_4a_3x3", 80, 192, 3, 1, 0)?,
            ],
            mixed,
        })
    }
}

static INCEPTION_V3: ArchSpec = ArchSpec {
    name: "inception-v3",
    feature_dim: 2048,
    min_input: 75,
    default_input: 299,
    imagenet_normalization: Normalization::IMAGENET,
    build: |vb| Ok(Box::new(InceptionV3::new(vb)?)),
};

impl Arch {
    pub const INCEPTION_V3: Arch = Arch::new(&INCEPTION_V3);
}

/// This module's entry in the registry ([`crate::nn::architectures`]).
pub static ARCHITECTURES: &[Arch] = &[Arch::INCEPTION_V3];

impl Backbone for InceptionV3 {
    fn arch(&self) -> Arch {
        Arch::INCEPTION_V3
    }

    fn stem(&self, x: &Tensor, train: bool, _blocked: bool) -> Result<Tensor> {
        self.conv1a.f(x, train)
    }

    fn body(&self, low: &Tensor, t: bool) -> Result<Tensor> {
        let x = self.stem[1].f(&self.stem[0].f(low, t)?, t)?;
        let x = max_pool2d(&x, 3, 2, 0)?;
        let x = self.stem[3].f(&self.stem[2].f(&x, t)?, t)?;
        let mut x = max_pool2d(&x, 3, 2, 0)?;
        for m in &self.mixed[..self.mixed.len().saturating_sub(1)] {
            x = m.forward_t(&x, t)?;
        }
        Ok(x)
    }

    fn last_block(&self, body: &Tensor, t: bool) -> Result<Tensor> {
        match self.mixed.last() {
            Some(m) => m.forward_t(body, t),
            None => Ok(body.clone()),
        }
    }

    fn last_block_prefixes(&self) -> Vec<String> {
        vec!["Mixed_7c.".into()]
    }
}
