//! The constants of the approximations every version of `exp`, `erf` and GELU shares (the
//! scalar ones in `math` and the AVX2 and AVX-512 ones), kept here so that no kernel file
//! reads another's.

/// ln 2 split in two for `exp`'s range reduction: `r = x - n LN2_HI - n LN2_LO`.
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;

/// `exp`'s polynomial coefficients (Cephes' expf, degree 5), highest power first.
pub const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp`'s input clamp: below, the result would be a denormal; above, infinite.
pub const EXP_MIN: f32 = -87.0;
pub const EXP_MAX: f32 = 88.0;

/// The clamp of `erf`, where its rational approximation reaches the largest f32 below 1.
#[allow(clippy::excessive_precision)]
pub const ERF_CLAMP: f32 = 3.832_506_9;

/// `erf`'s numerator coefficients (Eigen's rational approximation: a polynomial in x², then
/// times x), highest power first.
#[allow(clippy::excessive_precision)]
pub const ERF_P: [f32; 7] = [
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
];

/// `erf`'s denominator coefficients (a polynomial in x²), highest power first.
#[allow(clippy::excessive_precision)]
pub const ERF_Q: [f32; 5] = [
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
];

/// GELU's tanh approximation: `x/2 (1 + tanh(GELU_TANH_A (x + GELU_TANH_B x³)))`;
/// `GELU_TANH_A` is sqrt(2 / pi).
pub const GELU_TANH_A: f32 = 0.797_884_6;
pub const GELU_TANH_B: f32 = 0.044_715;

/// 1 / sqrt(2 pi), of the normal density in GELU's derivative.
pub const INV_SQRT_2PI: f32 = 0.398_942_3;
