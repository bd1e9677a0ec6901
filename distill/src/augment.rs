//! Input augmentation: random translation ("jitter") of images.

use rand::Rng;

/// Shifts each image of `batch` (row-major `height x width` images, one
/// after the other) by a random offset in `-max_shift..=max_shift` pixels
/// along each axis, filling uncovered pixels with zero.
pub fn jitter_images<R: Rng>(
    batch: &mut [f32],
    height: usize,
    width: usize,
    max_shift: usize,
    rng: &mut R,
) {
    if max_shift == 0 {
        return;
    }
    let pixels = height * width;
    let m = max_shift as i64;
    let mut shifted = vec![0f32; pixels];
    for image in batch.chunks_exact_mut(pixels) {
        let dy = rng.random_range(-m..=m) as isize;
        let dx = rng.random_range(-m..=m) as isize;
        if dx == 0 && dy == 0 {
            continue;
        }
        shifted.iter_mut().for_each(|p| *p = 0.0);
        for y in 0..height as isize {
            let src_y = y - dy;
            if src_y < 0 || src_y >= height as isize {
                continue;
            }
            let (x0, x1) = ((dx.max(0)) as usize, (width as isize + dx.min(0)) as usize);
            let src_row = src_y as usize * width;
            let dst_row = y as usize * width;
            let src_x0 = (x0 as isize - dx) as usize;
            shifted[dst_row + x0..dst_row + x1]
                .copy_from_slice(&image[src_row + src_x0..src_row + src_x0 + (x1 - x0)]);
        }
        image.copy_from_slice(&shifted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::seed::{self, Stream};

    /// Reference: out[y][x] = in[y - dy][x - dx] where in range, else 0.
    fn shift_ref(img: &[f32], h: usize, w: usize, dy: isize, dx: isize) -> Vec<f32> {
        let mut out = vec![0.0; h * w];
        for y in 0..h as isize {
            for x in 0..w as isize {
                let (sy, sx) = (y - dy, x - dx);
                if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                    out[(y * w as isize + x) as usize] = img[(sy * w as isize + sx) as usize];
                }
            }
        }
        out
    }

    #[test]
    fn every_image_is_one_of_the_allowed_shifts() {
        let (h, w) = (5, 6);
        let img: Vec<f32> = (1..=30).map(|v| v as f32).collect();
        let mut batch: Vec<f32> = img.iter().cycle().take(30 * 40).copied().collect();
        jitter_images(&mut batch, h, w, 2, &mut seed::rng(1, Stream::Jitter));
        let mut seen = std::collections::HashSet::new();
        for out in batch.chunks(30) {
            let shift = (-2..=2)
                .flat_map(|dy| (-2..=2).map(move |dx| (dy, dx)))
                .find(|&(dy, dx)| shift_ref(&img, h, w, dy, dx) == out)
                .expect("output is a shift of at most 2 pixels");
            seen.insert(shift);
        }
        assert!(seen.len() > 10, "shifts vary: {seen:?}");
    }

    #[test]
    fn zero_shift_changes_nothing() {
        let mut batch = vec![1.0f32; 16];
        jitter_images(&mut batch, 4, 4, 0, &mut seed::rng(1, Stream::Jitter));
        assert_eq!(batch, vec![1.0; 16]);
    }
}
