//! The dwcp command-line tool.

fn main() {
    println!("dwcp");
}
