//! Deterministic safetensors bytes. The `safetensors` crate writes the
//! header's metadata in a `HashMap`'s random order, so equal tensors and
//! metadata could give different bytes (and checksums) from run to run.

use std::collections::BTreeMap;

/// safetensors writes metadata in a `HashMap`'s random order; rewrite the
/// JSON header with sorted keys (same length, same padding) so that equal
/// models give equal bytes.
pub fn with_sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte length")) as usize;
    let header = &bytes[8..8 + header_len];
    let mut top: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).expect("safetensors wrote a JSON header");
    if let Some(meta) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(meta.take()).expect("metadata is an object");
        *meta = serde_json::to_value(sorted).expect("metadata serialises");
    }
    let mut json = serde_json::to_vec(&top).expect("header serialises");
    assert!(
        json.len() <= header_len,
        "a reordered header has the same length"
    );
    json.resize(header_len, b' ');
    bytes[8..8 + header_len].copy_from_slice(&json);
    bytes
}

#[cfg(test)]
mod tests {
    use super::with_sorted_header;
    use safetensors::tensor::{Dtype, TensorView};
    use std::collections::HashMap;

    #[test]
    fn equal_contents_give_equal_bytes_whatever_the_map_order() {
        let data = [1u8, 2, 3];
        let encode = || {
            let meta: HashMap<String, String> = (0..20)
                .map(|i| (format!("key{i}"), i.to_string()))
                .collect();
            let view = TensorView::new(Dtype::U8, vec![3], &data).unwrap();
            with_sorted_header(safetensors::serialize([("t", view)], Some(meta)).unwrap())
        };
        let first = encode();
        for _ in 0..5 {
            assert_eq!(encode(), first);
        }
        let back = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(back.tensor("t").unwrap().data(), &data);
    }
}
